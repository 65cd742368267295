"""ImagingStudy: the DICOM study a pre-read read (identified by its Study Instance UID and
accession number); read and search."""

from __future__ import annotations

from node.fhir.routers.common import resource_router

router = resource_router("ImagingStudy")
