"""Observation: one per finding anchor of a pre-read (identified by the anchor's tracking
UID and anchor id); read and search (derived-from, subject, code, identifier, status)."""

from __future__ import annotations

from node.fhir.routers.common import resource_router

router = resource_router("Observation")
