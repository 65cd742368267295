"""The study ledger on SQLite and PostgreSQL: versions, duplicates, the state machine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from node.ledger import InstanceHeader, LedgerError, StudyLedger, StudyState


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StudyLedger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    ledger = StudyLedger(url)
    yield ledger
    ledger.close()


def header(study: str = "1.2.3", series: str = "1.2.3.1", sop: str = "1.2.3.1.1") -> InstanceHeader:
    return InstanceHeader(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR",
        body_part="CHEST",
        patient_id="P1",
        accession_number="A1",
    )


def record(ledger: StudyLedger, h: InstanceHeader, sha: str = "a" * 64, revision: int = 1) -> int:
    out = ledger.record_instance(
        h,
        path=f"{h.sop_instance_uid}.dcm",
        sha256=sha,
        size_bytes=10,
        revision=revision,
        calling_ae="T",
    )
    return out.study_version


def test_backend_is_the_requested_one(request: pytest.FixtureRequest, ledger: StudyLedger) -> None:
    wanted = request.node.callspec.params["ledger"]
    assert ledger.engine.dialect.name == wanted
    with ledger.engine.connect() as conn:
        version = conn.execute(
            text("select sqlite_version()" if wanted == "sqlite" else "select version()")
        ).scalar_one()
    assert wanted == "sqlite" or str(version).startswith("PostgreSQL")


def test_study_walks_the_state_machine(ledger: StudyLedger) -> None:
    assert record(ledger, header()) == 1
    assert record(ledger, header(sop="1.2.3.1.2")) == 1
    (done,) = ledger.complete_quiet_studies(0)
    assert done.instance_count == 2
    ledger.mark_queued("1.2.3", 1, "task-1")
    assert ledger.start_run("1.2.3", 1) is not None
    ledger.finish("1.2.3", 1, ok=True, result={"anchors": []})
    study = ledger.get_study("1.2.3")
    assert study is not None and study.state is StudyState.DONE and study.result == {"anchors": []}
    # a redelivered task finds nothing to do
    assert ledger.start_run("1.2.3", 1) is None
    assert ledger.counts_by_state() == {"done": 1}


def test_forbidden_transition_is_refused(ledger: StudyLedger) -> None:
    record(ledger, header())
    with pytest.raises(LedgerError, match="received -> done"):
        ledger.finish("1.2.3", 1, ok=True)
    with pytest.raises(LedgerError, match="not queued"):
        ledger.start_run("1.2.3", 1)


def test_identical_duplicate_is_idempotent(ledger: StudyLedger) -> None:
    record(ledger, header())
    out = ledger.record_instance(
        header(), path="x", sha256="a" * 64, size_bytes=10, revision=1, calling_ae="T"
    )
    assert out.duplicate
    assert ledger.instance_count() == 1
    assert ledger.get_study("1.2.3").instance_count == 1  # type: ignore[union-attr]


def test_instance_after_completion_opens_a_new_version(ledger: StudyLedger) -> None:
    record(ledger, header())
    ledger.complete_quiet_studies(0)
    assert record(ledger, header(sop="1.2.3.1.9")) == 2
    # a re-sent instance with other bytes is a new revision, in the open version
    assert record(ledger, header(), sha="b" * 64, revision=2) == 2
    versions = ledger.study_versions("1.2.3")
    assert [(v.version, v.state.value, v.instance_count) for v in versions] == [
        (1, "complete", 1),
        (2, "received", 2),
    ]
    latest = {i.sop_instance_uid: i.revision for i in ledger.instances_of("1.2.3")}
    assert latest == {"1.2.3.1.1": 2, "1.2.3.1.9": 1}
    assert {i.sop_instance_uid for i in ledger.instances_of("1.2.3", up_to_version=1)} == {
        "1.2.3.1.1"
    }


def test_stuck_studies_are_found(ledger: StudyLedger) -> None:
    record(ledger, header())
    ledger.complete_quiet_studies(0)
    ledger.mark_queued("1.2.3", 1, "t")
    assert [s.study_uid for s in ledger.stuck_studies(0)] == ["1.2.3"]
    assert ledger.stuck_studies(3600) == []


def queued(ledger: StudyLedger) -> None:
    record(ledger, header())
    ledger.complete_quiet_studies(0)
    ledger.mark_queued("1.2.3", 1, "t")


def test_a_running_version_is_not_started_twice(ledger: StudyLedger) -> None:
    queued(ledger)
    assert ledger.start_run("1.2.3", 1, owner="w1", lease_seconds=0.5) is not None
    # the reconciler does not take a version under a live lease for stuck, nor re-queue it
    assert ledger.stuck_studies(0) == []
    with pytest.raises(LedgerError, match="live lease"):
        ledger.mark_queued("1.2.3", 1, "t")
    assert ledger.start_run("1.2.3", 1, owner="w2") is None  # a re-sent task while w1 runs
    time.sleep(0.6)  # w1 died: its lease ran out
    assert [s.study_uid for s in ledger.stuck_studies(0)] == ["1.2.3"]
    assert ledger.start_run("1.2.3", 1, owner="w2") is not None
    assert ledger.start_run("1.2.3", 1, owner="w1") is None
    done = ledger.finish("1.2.3", 1, ok=True, result={"anchors": []})
    # the first run's late finish with the same outcome changes nothing
    assert ledger.finish("1.2.3", 1, ok=True, result={"anchors": ["late"]}) == done
    with pytest.raises(LedgerError, match="done -> failed"):
        ledger.finish("1.2.3", 1, ok=False, reason="late failure")
    assert ledger.start_run("1.2.3", 1, owner="w3") is None


def test_a_released_run_is_claimable_at_once(ledger: StudyLedger) -> None:
    queued(ledger)
    assert ledger.start_run("1.2.3", 1) is not None  # owner: this process
    assert ledger.start_run("1.2.3", 1, owner="other") is None
    assert not ledger.release_run("1.2.3", 1, owner="other")
    assert ledger.release_run("1.2.3", 1)
    running = ledger.start_run("1.2.3", 1, owner="other")
    assert running is not None and running.state is StudyState.RUNNING


def test_concurrent_starts_run_a_version_once(ledger: StudyLedger) -> None:
    queued(ledger)
    workers = [StudyLedger(ledger.url) for _ in range(6)]
    started: list[bool] = [False] * len(workers)
    gate = threading.Barrier(len(workers))

    def start(i: int) -> None:
        gate.wait()
        started[i] = workers[i].start_run("1.2.3", 1, owner=f"w{i}") is not None

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for w in workers:
        w.close()
    assert started.count(True) == 1, started


def test_saving_anchors_twice_keeps_one_of_each(ledger: StudyLedger) -> None:
    anchor = {"anchor_id": "A1", "tracking_uid": "2.25.1", "version": 1, "kind": "finding"}
    anchor["label"] = "nodule"
    other = {**anchor, "anchor_id": "A2", "tracking_uid": "2.25.2"}
    assert ledger.save_anchors("1.2.3", 1, [anchor, other]) == 2
    assert ledger.save_anchors("1.2.3", 1, [anchor, {**anchor, "version": 2}]) == 1
    assert [(a["tracking_uid"], a["version"]) for a in ledger.anchors_of("1.2.3")] == [
        ("2.25.1", 2),
        ("2.25.2", 1),
    ]
    assert len(ledger.anchors_of("1.2.3", all_versions=True)) == 3
