"""The FHIR R4 endpoint of the node: what the hospital RIS reads and asks.

Layout (the FastAPI full-stack template's): :mod:`node.fhir.main` builds the app, one
router per resource under :mod:`node.fhir.routers`, dependencies in :mod:`node.fhir.deps`.
Resources are built in :mod:`node.fhir.resources` and validated with ``fhir.resources``
(its R4B models, keeping to elements that exist in R4 4.0.1); :mod:`node.fhir.store`
keeps them in the node's database with a search index, :mod:`node.fhir.subscriptions`
notifies Subscriptions of new versions and :mod:`node.fhir.followups` keeps the follow-up
questions' jobs; :func:`node.fhir.projection.record_preread` is what a worker calls after a
pre-read. Every resource says it is AI-generated and preliminary.
"""

from __future__ import annotations

FHIR_JSON = "application/fhir+json"
FHIR_VERSION = "4.0.1"
