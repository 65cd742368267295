"""The study ledger on SQLite and PostgreSQL: versions, duplicates, the state machine."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from node.ledger import AnchorRow, InstanceHeader, LedgerError, Study, StudyLedger, StudyState
from sr_templates.model import (
    AnchorDistance,
    Measurements,
    OutputRef,
    PrereadResult,
    Region,
    ResultOutputs,
)
from tests.results import make_anchors, make_result


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


def test_backend_is_the_requested_one(
    request: pytest.FixtureRequest, ledger: StudyLedger, tmp_path: Path
) -> None:
    """The parametrised fixture really runs on each backend: a ledger written through one
    is read back by the server itself (not a silent fallback to another database)."""
    wanted = request.node.callspec.params["ledger"]
    record(ledger, header())
    with ledger.engine.connect() as conn:
        server = str(
            conn.execute(
                text("select sqlite_version()" if wanted == "sqlite" else "select version()")
            ).scalar_one()
        )
        studies = conn.execute(text("select count(*) from studies")).scalar_one()
    assert studies == 1
    if wanted == "sqlite":
        assert server.startswith("3.")
        assert (tmp_path / "ledger.sqlite3").stat().st_size > 0  # the file the URL names
    else:
        assert server.startswith("PostgreSQL")


def test_study_walks_the_state_machine(ledger: StudyLedger) -> None:
    assert record(ledger, header()) == 1
    assert record(ledger, header(sop="1.2.3.1.2")) == 1
    (done,) = ledger.complete_quiet_studies(0)
    assert done.instance_count == 2
    ledger.mark_queued("1.2.3", 1, "task-1")
    assert ledger.start_run("1.2.3", 1) is not None
    result = make_result(make_anchors())
    ledger.finish("1.2.3", 1, ok=True, result=result)
    study = ledger.get_study("1.2.3")
    assert study is not None and study.state is StudyState.DONE and study.result == result
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
    done = ledger.finish("1.2.3", 1, ok=True, result=make_result())
    # the first run's late finish with the same outcome changes nothing
    late = ledger.finish("1.2.3", 1, ok=True, result=make_result(make_anchors()))
    assert late == done and late.result is not None and late.result.anchors == ()
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
    anchor, other, _ = make_anchors()
    assert ledger.save_anchors("1.2.3", 1, [anchor, other]) == 2
    refined = anchor.refined(turn=1, attributes={"margin": "lobulated"})
    assert ledger.save_anchors("1.2.3", 1, [anchor, refined]) == 1
    assert ledger.anchors_of("1.2.3") == [refined, other]
    assert ledger.anchors_of("1.2.3", all_versions=True) == [anchor, other, refined]


def finished(ledger: StudyLedger, result: PrereadResult) -> None:
    queued(ledger)
    assert ledger.start_run("1.2.3", 1) is not None
    ledger.finish("1.2.3", 1, ok=True, result=result)


def full_result() -> PrereadResult:
    """A result using every part of the model: anchors of each kind with unrounded
    geometry, a refined anchor, a distance, outputs, a revision, a lateral view."""
    a1, a2, hilum = make_anchors()
    a1 = replace(a1, region=Region(200.123456789, 199.5, 260.0000001, 250.25, "ellipse"))
    a2 = a2.refined(turn=2, attributes={"margin": "lobulated"}, confidence=0.75)
    distance = AnchorDistance(
        tracking_uid="2.25.77", from_anchor="A1", from_tracking_uid=a1.tracking_uid,
        to_anchor="A3", to_tracking_uid=hilum.tracking_uid, to_label="right hilum",
        centres=43.21987654321, edges=12.5, units="mm", line=((230.0, 224.875), (430.0, 330.0)),
        source_sop_instance_uid=a1.source_sop_instance_uid, turn=2,
    )  # fmt: skip
    sr = OutputRef("/var/results/sr-v1-r2.dcm", "2.25.80", "2.25.81")
    return replace(
        make_result([a1, a2, hilum]),
        lateral=replace(make_result().frontal, reason="ViewPosition LL"),
        parse_warnings=("finding 3: unknown site 'azygos'",),
        model_text='{"findings": []}',
        engine_seconds=1.234567,
        outputs=ResultOutputs(sr=sr, seg=None),
        distances=(distance,),
        revision=2,
    )


def test_result_round_trips_through_json_and_the_ledger(ledger: StudyLedger) -> None:
    result = full_result()
    assert PrereadResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    finished(ledger, result)
    ledger.save_anchors("1.2.3", 1, result.anchors)
    study = ledger.get_study("1.2.3")
    assert study is not None and study.result == result
    assert study.result.amended and study.result.distances[0].centres == 43.21987654321
    assert ledger.anchors_of("1.2.3") == list(result.anchors)


def old_result_row(sop: str) -> dict[str, Any]:
    """A result as the node wrote it before the typed model: floats rounded, "size_text"
    kept, no "distances", "revision" or "outputs", anchors without their turns."""
    nodule = {
        "anchor_id": "A1", "tracking_uid": "2.25.11", "label": "right upper zone nodule",
        "kind": "finding", "finding": "nodule", "site": "right_upper_zone",
        "laterality": "right",
        "region": {"row0": 200.12, "col0": 199.5, "row1": 260.0, "col1": 250.25,
                   "shape": "ellipse"},
        "source_sop_instance_uid": sop,
        "measurements": {"long_axis": 12.04, "short_axis": 10.16, "area": 95.3, "units": "mm",
                         "area_units": "mm2", "spacing_source": "ImagerPixelSpacing"},
        "size_text": "12.0 x 10.2 mm, area 95 mm2",
        "attributes": {"margin": "spiculated"}, "confidence": None, "version": 1,
    }  # fmt: skip
    hilum = {
        "anchor_id": "A2", "tracking_uid": "2.25.12", "label": "right hilum",
        "kind": "landmark", "finding": None, "site": "right_hilum", "laterality": "right",
        "region": {"row0": 400.0, "col0": 300.0, "row1": 460.0, "col1": 360.0,
                   "shape": "rectangle"},
        "source_sop_instance_uid": sop, "measurements": None, "size_text": "",
        "attributes": {}, "confidence": None, "version": 1,
    }  # fmt: skip
    return {
        "notice": "DEMO - not for clinical use. AI-generated, preliminary, not a diagnosis",
        "is_demo": True, "engine": "demo", "model_id": "demo/blob-detector",
        "model_revision": "1", "prompt_version": "preread-v1", "node_version": "0.1.0",
        "structured": True, "parse_warnings": [], "findings_text": "A round opacity.",
        "impression": "A nodule.", "model_text": "{}",
        "frontal": {"sop_instance_uid": sop, "reason": "ViewPosition PA"}, "lateral": None,
        "pixel_spacing_mm": [0.2, 0.2], "spacing_source": "ImagerPixelSpacing",
        "engine_seconds": 0.123, "anchors": [nodule, hilum],
    }  # fmt: skip


def test_an_old_ledger_row_still_loads(ledger: StudyLedger) -> None:
    finished(ledger, make_result())
    row = old_result_row("1.2.3.1.1")
    with ledger.db.transaction() as s:  # the rows exactly as the old node wrote them
        s.execute(update(Study).where(Study.study_uid == "1.2.3").values(result=row))
        s.add_all(
            AnchorRow(study_uid="1.2.3", study_version=1, anchor_id=a["anchor_id"],
                      tracking_uid=a["tracking_uid"], version=1, kind=a["kind"],
                      label=a["label"], data=a)
            for a in row["anchors"]
        )  # fmt: skip
    study = ledger.get_study("1.2.3")
    assert study is not None and study.result is not None
    result = study.result
    assert (result.revision, result.distances, result.outputs) == (0, (), None)
    assert not result.amended and result.is_demo and result.pixel_spacing_mm == (0.2, 0.2)
    nodule, hilum = result.anchors
    assert nodule.region == Region(200.12, 199.5, 260.0, 250.25, "ellipse")
    assert nodule.measurements == Measurements(12.04, 10.16, 95.3, "mm", "ImagerPixelSpacing")
    assert nodule.size_text == row["anchors"][0]["size_text"]
    assert (nodule.created_turn, nodule.refined_turn, nodule.version) == (0, None, 1)
    assert dict(nodule.attributes) == {"margin": "spiculated"}
    assert result.findings == (nodule,) and result.landmarks == (hilum,)
    assert hilum.measurements is None and hilum.site == "right_hilum"
    assert ledger.anchors_of("1.2.3") == [nodule, hilum]
    # written back by the new node, it reads the same
    assert PrereadResult.from_json(result.to_json()) == result


def test_an_unreadable_result_row_is_logged_and_shown_as_none(
    ledger: StudyLedger, caplog: pytest.LogCaptureFixture
) -> None:
    finished(ledger, make_result())
    broken = {**old_result_row("1.2.3.1.1"), "model_id": None}
    with ledger.db.transaction() as s:
        s.execute(update(Study).where(Study.study_uid == "1.2.3").values(result=broken))
    with caplog.at_level(logging.WARNING, logger="medgemma.ledger"):
        study = ledger.get_study("1.2.3")
    assert study is not None and study.state is StudyState.DONE and study.result is None
    assert "study 1.2.3 v1: stored result unreadable" in caplog.text
    assert "model_id" in caplog.text
