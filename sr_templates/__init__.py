"""DICOM results: coded concepts, the chest sign ontology, TID 1500 SR and SEG builders.

- :mod:`sr_templates.model`: the typed pre-read result (anchors, regions, measurements,
  distances), shared by the worker, the ledger, the builders and the FHIR projection.
- :mod:`sr_templates.codes`: every code and UID root (with sources).
- :mod:`sr_templates.signs`: typical chest X-ray signs of a few conditions, checked
  against an anchor's facts.
- :mod:`sr_templates.ontology`: vocabulary terms -> codes, English and Chinese terms,
  lookups by term.
- :mod:`sr_templates.report`: :func:`build_measurement_report` (TID 1500, Comprehensive 3D SR).
- :mod:`sr_templates.segmentation`: :func:`build_segmentation` (binary SEG).
- :mod:`sr_templates.series`: series numbers and deterministic UIDs.

The builders are imported on first use, so ``sr_templates.codes`` and
``sr_templates.ontology`` load without highdicom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "build_measurement_report",
    "build_segmentation",
    "derived_uid",
    "series_number",
    "series_uid",
]

if TYPE_CHECKING:
    from sr_templates.report import build_measurement_report
    from sr_templates.segmentation import build_segmentation
    from sr_templates.series import derived_uid, series_number, series_uid

_HOMES = {
    "build_measurement_report": "sr_templates.report",
    "build_segmentation": "sr_templates.segmentation",
    "derived_uid": "sr_templates.series",
    "series_number": "sr_templates.series",
    "series_uid": "sr_templates.series",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'sr_templates' has no attribute {name!r}")
