"""Provenance: who wrote a pre-read's resources (the model Device) from which ImagingStudy;
read and search by target."""

from __future__ import annotations

from node.fhir.routers.common import resource_router

router = resource_router("Provenance")
