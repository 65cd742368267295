"""The study ledger on SQLite and PostgreSQL: versions, duplicates, the state machine."""

from __future__ import annotations

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


def test_backend_is_the_requested_one(ledger: StudyLedger) -> None:
    with ledger.engine.connect() as conn:
        version = conn.execute(
            text(
                "select sqlite_version()" if ledger.url.startswith("sqlite") else "select version()"
            )
        ).scalar_one()
    assert version


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
