"""DICOM results of a pre-read: the TID 1500 SR and the SEG, written durably and queued.

Files go to ``<data_dir>/results/<StudyInstanceUID>/{sr,seg}-v<version>.dcm`` and one
outbox row per configured destination; the node's outbox sender delivers them. UIDs are
derived from (node AE title, kind, study, version), so a rebuilt or re-sent result keeps
its SOP Instance UID and the PACS never sees a duplicate.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from node import wakeup
from node.ledger import StudyLedger
from node.outbox import Outbox
from node.settings import Settings
from node.spool import write_file_atomically
from sr_templates.model import OutputRef, PrereadResult, ResultOutputs
from sr_templates.report import build_measurement_report
from sr_templates.segmentation import build_segmentation
from sr_templates.series import derived_uid, instance_number, series_number, series_uid

log = logging.getLogger("medgemma.results")


def results_dir(settings: Settings, study_uid: str) -> Path:
    return settings.storage.results_path / study_uid


def _save(ds: Dataset, path: Path) -> None:
    write_file_atomically(path, lambda f: ds.save_as(f, enforce_file_format=True))


class ResultsError(Exception):
    """The SR/SEG of a result cannot be built (e.g. its image is no longer in the spool)."""


def _source_headers(
    settings: Settings, ledger: StudyLedger, study_uid: str, version: int, wanted: set[str]
) -> list[Dataset]:
    """Headers (no pixel data) of the study's images that the result refers to."""
    out: list[Dataset] = []
    for inst in ledger.instances_of(study_uid, up_to_version=version):
        if inst.sop_instance_uid in wanted:
            path = settings.storage.spool_path / inst.path
            try:
                out.append(dcmread(path, stop_before_pixels=True))
            except OSError as exc:
                raise ResultsError(
                    f"image {inst.sop_instance_uid} is no longer readable in the spool "
                    f"({type(exc).__name__})"
                ) from exc
    return out


def result_file_name(kind: str, version: int, revision: int = 0) -> str:
    """``sr-v2.dcm`` for the pre-read of study version 2, ``sr-v2r1.dcm`` for its first
    follow-up amendment."""
    return f"{kind}-v{version}.dcm" if revision == 0 else f"{kind}-v{version}r{revision}.dcm"


_RESULT_FILE = re.compile(r"sr-v(\d+)(?:r(\d+))?\.dcm")


def _predecessor(directory: Path, version: int, revision: int) -> Dataset | None:
    """The newest SR written before (version, revision), which this one amends."""
    earlier: list[tuple[int, int, Path]] = []
    for path in directory.glob("sr-v*.dcm") if directory.is_dir() else ():
        m = _RESULT_FILE.fullmatch(path.name)
        if m:
            key = (int(m[1]), int(m[2] or 0))
            if key < (version, revision):
                earlier.append((*key, path))
    if not earlier:
        return None
    return dcmread(max(earlier)[2], stop_before_pixels=True)


@dataclass(frozen=True)
class BuiltResults:
    """The SR (always) and SEG (None without findings) of one result revision, not yet
    written anywhere."""

    study_uid: str
    version: int
    revision: int
    sr: Dataset
    seg: Dataset | None


def build_results(
    settings: Settings, ledger: StudyLedger, study_uid: str, version: int, result: PrereadResult
) -> BuiltResults:
    """Build the SR and SEG of ``result`` in memory; nothing is written.

    ``result.revision`` 0 is the pre-read of study ``version``; a follow-up amendment
    (revision 1, 2, ...) gets its own SOP Instance UIDs and names the SR it amends in the
    Predecessor Documents Sequence. Raises ResultsError with a sentence for the user.
    """
    node = settings.dicom.ae_title
    revision = result.revision
    frontal = result.frontal.sop_instance_uid
    wanted = {frontal} | ({result.lateral.sop_instance_uid} if result.lateral else set())
    sources = _source_headers(settings, ledger, study_uid, version, wanted)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    if frontal not in by_uid:
        raise ResultsError(
            f"the image the findings are drawn on ({frontal}) is not among the study's "
            "instances in the spool, so no SR or SEG can refer to it"
        )
    ordered = [by_uid[frontal]] + [ds for uid, ds in by_uid.items() if uid != frontal]
    directory = results_dir(settings, study_uid)
    try:
        sr = build_measurement_report(
            result,
            ordered,
            series_number=series_number("sr"),
            instance_number=instance_number(version, revision),
            sop_instance_uid=derived_uid("sr", study_uid, version, node=node, revision=revision),
            series_instance_uid=series_uid("sr", study_uid, node=node),
            predecessor=_predecessor(directory, version, revision),
            node=node,
        )
        seg = build_segmentation(
            result,
            by_uid[frontal],
            series_number=series_number("seg"),
            instance_number=instance_number(version, revision),
            sop_instance_uid=derived_uid("seg", study_uid, version, node=node, revision=revision),
            series_instance_uid=series_uid("seg", study_uid, node=node),
            node=node,
        )
    except (TypeError, ValueError) as exc:
        raise ResultsError(f"the SR/SEG cannot be built: {exc}") from exc
    return BuiltResults(study_uid, version, revision, sr, seg)


def store_results(settings: Settings, ledger: StudyLedger, built: BuiltResults) -> ResultOutputs:
    """Write the built SR and SEG durably and queue them for every destination.

    The SEG first: its rows are committed and the sender woken before the SR is encoded
    (pydicom writes the SR's content tree slower than the SEG's pixels), so the PACS is
    storing the larger object while the SR is written. Each file is durable before its
    rows are committed.
    """
    study_uid, version, revision = built.study_uid, built.version, built.revision
    directory = results_dir(settings, study_uid)
    outbox = Outbox(ledger, settings.outbox)
    written: dict[str, OutputRef] = {}
    for kind, ds in (("seg", built.seg), ("sr", built.sr)):
        if ds is None:
            continue
        path = directory / result_file_name(kind, version, revision)
        _save(ds, path)
        outbox.enqueue(
            study_uid=study_uid,
            study_version=version,
            kind=kind,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            path=path,
            destinations=list(settings.destinations),
        )
        written[kind] = OutputRef(str(path), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))
        # the rows are committed: the node's sender delivers them now, not at its next poll
        wakeup.ring(settings.queue.broker_url)
    outputs = ResultOutputs(sr=written.get("sr"), seg=written.get("seg"))
    log.info(
        "study %s v%d r%d: SR %s%s written, %d destination(s)",
        study_uid,
        version,
        revision,
        outputs.sr.sop_instance_uid if outputs.sr else "-",
        f", SEG {outputs.seg.sop_instance_uid}" if outputs.seg else " (no findings: no SEG)",
        len(settings.destinations),
    )
    return outputs


def publish_results(
    settings: Settings, ledger: StudyLedger, study_uid: str, version: int, result: PrereadResult
) -> ResultOutputs:
    """Build, store and queue the SR (always) and SEG (when there are findings).

    Returns each file's path and UIDs, for the study's result record.
    """
    return store_results(
        settings, ledger, build_results(settings, ledger, study_uid, version, result)
    )
