"""Spool retention with real files: what is removed, what is kept, the emergency clean,
and a study sent again after its files were removed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from node.db import utcnow
from node.fhir.models import FollowupRow, FollowupState
from node.fhir.store import FhirStore
from node.ledger import InstanceHeader, Study, StudyLedger, StudyState
from node.outbox import Outbox
from node.retention import SpoolRetention, read_retention_state, results_path
from node.runtime import NodeRuntime
from node.settings import Destination, Settings
from node.status import ScpProbe, collect_status, render_status
from node.synthetic import make_secondary_capture, make_two_view_study, write_study
from tests.conftest import make_settings, send_study, wait_for_state
from tests.peers import free_port, wait_for


def _settings(tmp_path: Path, **retention: object) -> Settings:
    return make_settings(tmp_path, retention=retention)


def _study(
    settings: Settings, ledger: StudyLedger, n: int, *, state: StudyState, age_days: float
) -> str:
    """A study with one real spool file (and, when done, a result file) in ``state``."""
    study_uid = f"1.2.826.0.1.3680043.10.777.{n}"
    ds = make_secondary_capture(study_uid=study_uid, seed=n)
    (source,) = write_study(settings.storage.data_path / "incoming" / str(n), [ds])
    relative = f"{study_uid}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    target = settings.storage.spool_path / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    source.replace(target)
    header = InstanceHeader(
        study_uid=study_uid,
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        modality="CR",
    )
    ledger.record_instance(
        header, path=relative, sha256=f"{n:064x}", size_bytes=target.stat().st_size,
        revision=1, calling_ae="TEST",
    )  # fmt: skip
    ledger.set_state(study_uid, 1, StudyState.COMPLETE)
    if state is not StudyState.COMPLETE:
        ledger.mark_queued(study_uid, 1, f"task-{n}")
    if state is StudyState.DONE:
        ledger.start_run(study_uid, 1)
        ledger.finish(study_uid, 1, ok=True)
        result = results_path(settings, study_uid) / "sr-v1r0.dcm"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_bytes(b"result")
    past = utcnow() - timedelta(days=age_days)
    with ledger.db.transaction() as s:
        s.execute(
            update(Study)
            .where(Study.study_uid == study_uid)
            .values(updated_at=past, last_instance_at=past)
        )
    return study_uid


def _files(settings: Settings, study_uid: str) -> list[Path]:
    roots = [settings.storage.spool_path / study_uid, results_path(settings, study_uid)]
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_old_finished_delivered_studies_go_undelivered_and_in_work_ones_stay(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, days=30, emergency_free_mb=0)
    ledger = StudyLedger(settings.storage.resolved_database_url())
    store = FhirStore(ledger)
    outbox = Outbox(ledger, settings.outbox)
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    delivered = _study(settings, ledger, 1, state=StudyState.DONE, age_days=40)
    undelivered = _study(settings, ledger, 2, state=StudyState.DONE, age_days=40)
    queued = _study(settings, ledger, 3, state=StudyState.QUEUED, age_days=40)
    asked = _study(settings, ledger, 4, state=StudyState.DONE, age_days=40)
    recent = _study(settings, ledger, 5, state=StudyState.DONE, age_days=2)
    for n, uid in enumerate((delivered, undelivered)):
        outbox.enqueue(
            study_uid=uid, study_version=1, kind="sr",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            sop_instance_uid=f"2.25.{n + 1}", path=results_path(settings, uid) / "sr-v1r0.dcm",
            destinations=[dest],
        )  # fmt: skip
    (first,) = [d for d in outbox.due() if d.study_uid == delivered]
    assert outbox.mark_delivered(first.id)
    with store.db.transaction() as s:  # an open follow-up question about `asked`
        s.add(FollowupRow(id="q1", report_id="r1", study_uid=asked, state=FollowupState.QUEUED))

    retention = SpoolRetention(settings, ledger)
    eligible = [c.study_uid for c in retention.candidates()]
    assert eligible == [delivered, recent]
    report = retention.run_once()

    assert report.studies == [delivered] and report.reason == "age"
    assert _files(settings, delivered) == []
    assert not (settings.storage.spool_path / delivered).exists()
    for kept in (undelivered, queued, asked, recent):
        assert _files(settings, kept), kept
    (version,) = ledger.study_versions(delivered)
    assert version.state is StudyState.DONE and version.purged_at is not None
    assert ledger.instances_of(delivered) == []
    assert ledger.get_study(undelivered).purged_at is None  # type: ignore[union-attr]
    # a second pass finds nothing more to remove
    assert retention.run_once().studies == []
    ledger.close()


def test_emergency_clean_removes_oldest_eligible_until_free(tmp_path: Path) -> None:
    settings = _settings(tmp_path, days=0, emergency_free_mb=1)
    ledger = StudyLedger(settings.storage.resolved_database_url())
    uids = [
        _study(settings, ledger, n, state=StudyState.DONE, age_days=age)
        for n, age in ((11, 3.0), (12, 2.0), (13, 1.0))
    ]
    busy = _study(settings, ledger, 14, state=StudyState.COMPLETE, age_days=5.0)
    spool = settings.storage.spool_path
    sizes = {u: sum(p.stat().st_size for p in (spool / u).rglob("*") if p.is_file()) for u in uids}

    def used() -> int:  # a disk that holds only the spool
        return sum(p.stat().st_size for p in spool.rglob("*") if p.is_file())

    # 1 MiB free once the oldest finished study is gone: only it must go
    capacity = 2**20 + used() - sizes[uids[0]] + 1
    free: Callable[[], int] = lambda: capacity - used()  # noqa: E731
    retention = SpoolRetention(settings, ledger, free_bytes=free)
    dry = retention.run_once(dry_run=True)
    assert dry.studies == [uids[0]] and dry.reason == "emergency"
    assert all(_files(settings, u) for u in uids)  # a dry run removes nothing

    report = retention.run_once()
    assert report.studies == [uids[0]] and report.reason == "emergency"
    assert free() >= 2**20
    assert _files(settings, uids[0]) == []
    assert _files(settings, uids[1]) and _files(settings, uids[2]) and _files(settings, busy)
    ledger.close()


def test_serve_purges_a_read_study_and_reads_it_again_when_resent(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    runtime = node_factory(retention={"days": 0.00002, "interval_seconds": 0.5})
    images = make_two_view_study(seed=3)
    study_uid = str(images[0].dataset.StudyInstanceUID)
    send_study(runtime, tmp_path / "send1", images)
    wait_for_state(runtime, study_uid, {"done"}, timeout=120)
    spool = runtime.settings.storage.spool_path / study_uid
    wait_for(lambda: not spool.exists(), 20, 0.2, "the study's spool files removed")
    state = wait_for(
        lambda: read_retention_state(runtime.settings.storage.data_path), 10, 0.2, "state"
    )
    status = collect_status(runtime.settings, probe=lambda s: _listening())
    assert status.retention["last_run"]["next_run"]
    text = render_status(status)
    assert "Retention: after 2e-05 days" in text and "files removed" in text
    assert state is not None

    # the same instances again: stored anew (not duplicates) as version 2 and read
    send_study(runtime, tmp_path / "send2", images)
    study = wait_for_state(runtime, study_uid, {"done", "failed"}, timeout=120)
    assert study.version == 2 and study.state is StudyState.DONE, study.reason
    assert study.result is not None and study.result.anchors


def _listening() -> ScpProbe:
    return ScpProbe(True, "test")
