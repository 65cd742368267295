"""AuditEvent: read and search, only with the admin scope ``system/AuditEvent.read``."""

from __future__ import annotations

from node.fhir.routers.common import resource_router

router = resource_router("AuditEvent")
