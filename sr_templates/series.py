"""Stable series numbers and deterministic UIDs of the node's result objects.

The outbox may deliver a result twice (a retry after a lost C-STORE response) and a
worker may rebuild it (a task re-run after a crash): both must give the PACS the same
SOP Instance UID, or the PACS would show duplicates. So the UIDs of a result are derived
from what identifies it, under :data:`sr_templates.codes.UID_ROOT`:

- series: (node, kind, study) - one SR series and one SEG series per study and node,
  which amended versions join;
- instance: (node, kind, study, version) - version is the study version the result was
  built from (the ledger's), so a new version is a new instance in the same series.

``node`` tells two nodes apart that read the same study (their results must not share
UIDs); it defaults to the node's default AE title.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from pydicom.uid import UID, generate_uid

from sr_templates.codes import SEG_SERIES_NUMBER, SR_SERIES_NUMBER, UID_ROOT

__all__ = [
    "DEFAULT_NODE",
    "ResultKind",
    "derived_uid",
    "device_uid",
    "instance_number",
    "series_number",
    "series_uid",
]

ResultKind = Literal["sr", "seg"]
_KINDS: Final = get_args(ResultKind)

#: The node name used when none is given: the default AE title (config/node.toml).
DEFAULT_NODE: Final = "MEDGEMMA"
# Versioned namespace: a change of derivation rule must change every derived UID.
_NAMESPACE: Final = "medgemma-node/results/v1"
# pydicom hashes "".join(entropy_srcs): join with a separator that cannot occur in the
# parts, so ("ab", "c") and ("a", "bc") differ.
_SEPARATOR: Final = "\x1f"


def _check_kind(kind: object) -> ResultKind:
    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r} is not one of {_KINDS}")
    return kind  # type: ignore[return-value]


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value or _SEPARATOR in value:
        raise ValueError(f"{name} must be a non-empty string without control characters")
    return value


def _uid(*parts: str, root: str) -> UID:
    return generate_uid(prefix=root, entropy_srcs=[_SEPARATOR.join((_NAMESPACE, *parts))])


def series_number(kind: ResultKind) -> int:
    """The Series Number of a result kind: SR 9001, SEG 9002 (codes.py)."""
    return {"sr": SR_SERIES_NUMBER, "seg": SEG_SERIES_NUMBER}[_check_kind(kind)]


def series_uid(
    kind: ResultKind, study_uid: str, *, node: str = DEFAULT_NODE, root: str = UID_ROOT
) -> UID:
    """The Series Instance UID of this node's ``kind`` results in a study (any version)."""
    _check_kind(kind)
    return _uid(
        "series", kind, _check_text("study_uid", study_uid), _check_text("node", node), root=root
    )


def derived_uid(
    kind: ResultKind,
    study_uid: str,
    version: int,
    *,
    node: str = DEFAULT_NODE,
    root: str = UID_ROOT,
    revision: int = 0,
) -> UID:
    """The SOP Instance UID of this node's ``kind`` result for (study, version, revision).

    ``revision`` 0 is the pre-read of the study version; each follow-up amendment of it
    (a refined anchor, a new region, a distance) is the next revision. The same arguments
    always give the same UID; any difference gives another.
    """
    _check_kind(kind)
    for name, value, least in (("version", version, 1), ("revision", revision, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    parts = [str(version)] if revision == 0 else [str(version), f"r{revision}"]
    return _uid(
        "instance",
        kind,
        _check_text("study_uid", study_uid),
        *parts,
        _check_text("node", node),
        root=root,
    )


def instance_number(version: int, revision: int = 0) -> int:
    """The Instance Number of a result: the study version for its pre-read, and
    1000 * version + revision for follow-up amendments (so the numbers never collide)."""
    return version if revision == 0 else 1000 * version + revision


def device_uid(model_id: str, model_revision: str, *, root: str = UID_ROOT) -> UID:
    """The Device Observer UID of the algorithm: one per (model id, revision)."""
    return _uid(
        "device",
        _check_text("model_id", model_id),
        _check_text("model_revision", model_revision),
        root=root,
    )
