"""Device: the model that wrote a pre-read (model id, revision, prompt and node versions);
read and search."""

from __future__ import annotations

from node.fhir.routers.common import resource_router

router = resource_router("Device")
