"""Leased delivery claims on SQLite and PostgreSQL, and opening a database of the old schema."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from node import delivery
from node.db import make_engine, utcnow
from node.ledger import InstanceHeader, StudyLedger, StudyState
from node.outbox import Outbox, OutboxRow
from node.settings import Destination, OutboxSettings

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
CR_CLASS, EXPLICIT_LE = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1"
DEST = Destination(ae_title="PACS", host="127.0.0.1", port=4242)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def ledger(url: str) -> Iterator[StudyLedger]:
    ledger = StudyLedger(url)
    yield ledger
    ledger.close()


def enqueue(outbox: Outbox, n: int, tmp_path: Path) -> None:
    for i in range(n):
        outbox.enqueue(
            study_uid="1.2.3", study_version=1, kind="sr", sop_class_uid=SR_CLASS,
            sop_instance_uid=f"1.2.3.9.{i}", path=tmp_path / f"{i}.dcm", destinations=[DEST],
        )  # fmt: skip


def test_concurrent_senders_never_claim_the_same_row(
    ledger: StudyLedger, url: str, tmp_path: Path
) -> None:
    enqueue(Outbox(ledger, OutboxSettings()), 60, tmp_path)
    # each sender has its own engine and connections, as separate processes would
    senders = [StudyLedger(url) for _ in range(4)]
    claimed: list[list[int]] = [[] for _ in senders]
    start = threading.Barrier(len(senders))
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            while ids := delivery.claim_due(
                senders[i].db, OutboxRow, owner=f"sender-{i}", lease_seconds=60, limit=3
            ):
                claimed[i].extend(ids)
                time.sleep(0.01)  # sending them
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(senders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in senders:
        s.close()
    assert not errors, errors
    every = [i for ids in claimed for i in ids]
    assert len(every) == len(set(every)) == 60, claimed
    assert sum(1 for ids in claimed if ids) >= 2  # the claims really were concurrent


def test_an_expired_lease_is_claimable_again_and_the_old_holder_is_refused(
    ledger: StudyLedger, tmp_path: Path
) -> None:
    outbox = Outbox(ledger, OutboxSettings(max_attempts=3))
    enqueue(outbox, 1, tmp_path)
    t0 = utcnow()
    held = delivery.claim_due(ledger.db, OutboxRow, owner="a", lease_seconds=10, limit=5, now=t0)
    assert len(held) == 1
    later = t0 + timedelta(seconds=5)
    assert (
        delivery.claim_due(ledger.db, OutboxRow, owner="b", lease_seconds=10, limit=5, now=later)
        == []
    )
    expired = t0 + timedelta(seconds=11)
    assert (
        delivery.claim_due(ledger.db, OutboxRow, owner="b", lease_seconds=10, limit=5, now=expired)
        == held
    )
    # "a" died and came back: it no longer holds the row, so it changes nothing
    assert not delivery.mark_delivered(ledger.db, OutboxRow, held[0], "a")
    assert (
        delivery.mark_failed(ledger.db, OutboxRow, held[0], "a", "x", max_attempts=3, base=1, cap=1)
        is None
    )
    assert delivery.mark_delivered(ledger.db, OutboxRow, held[0], "b")
    (row,) = outbox.deliveries()
    assert row.state is delivery.DeliveryState.DELIVERED and row.attempts == 1
    assert not delivery.mark_delivered(ledger.db, OutboxRow, held[0], "b")  # lease ended


def test_failed_and_released_rows_follow_their_schedule(
    ledger: StudyLedger, tmp_path: Path
) -> None:
    outbox = Outbox(ledger, OutboxSettings(max_attempts=2, backoff_base_seconds=30))
    enqueue(outbox, 2, tmp_path)
    first, second = (d.id for d in outbox.due())
    assert outbox.due() == []  # both held by this outbox
    assert outbox.release([second]) == 1
    assert [d.id for d in outbox.due()] == [second]  # released: due at once, no attempt counted
    assert outbox.mark_failed(first, "refused") is delivery.DeliveryState.PENDING
    assert outbox.due() == []  # failed: not due before the backoff (30 s)
    ids = delivery.claim_due(
        ledger.db,
        OutboxRow,
        owner="x",
        lease_seconds=5,
        limit=5,
        now=utcnow() + timedelta(seconds=31),
    )
    assert ids == [first]
    assert (
        delivery.mark_failed(
            ledger.db, OutboxRow, first, "x", "refused", max_attempts=2, base=30, cap=30
        )
        is delivery.DeliveryState.DEAD
    )


def test_enqueue_is_idempotent(ledger: StudyLedger, tmp_path: Path) -> None:
    outbox = Outbox(ledger, OutboxSettings())
    enqueue(outbox, 2, tmp_path)
    enqueue(outbox, 3, tmp_path)  # two already queued, one new
    assert [d.sop_instance_uid for d in outbox.deliveries()] == [
        "1.2.3.9.0",
        "1.2.3.9.1",
        "1.2.3.9.2",
    ]


OLD_STUDIES = """CREATE TABLE studies (
    id {pk}, study_uid VARCHAR(64) NOT NULL, version INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL, reason TEXT NOT NULL, patient_id VARCHAR(64) NOT NULL,
    accession_number VARCHAR(64) NOT NULL, study_date VARCHAR(8) NOT NULL,
    study_description VARCHAR(128) NOT NULL, instance_count INTEGER NOT NULL,
    attempts INTEGER NOT NULL, task_id VARCHAR(64) NOT NULL, result JSON,
    created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL,
    last_instance_at TIMESTAMP NOT NULL, completed_at TIMESTAMP, queued_at TIMESTAMP,
    started_at TIMESTAMP, finished_at TIMESTAMP,
    CONSTRAINT uq_study_version UNIQUE (study_uid, version))"""

OLD_OUTBOX = """CREATE TABLE outbox (
    id {pk}, study_uid VARCHAR(64) NOT NULL, study_version INTEGER NOT NULL,
    kind VARCHAR(16) NOT NULL, sop_class_uid VARCHAR(64) NOT NULL,
    sop_instance_uid VARCHAR(64) NOT NULL, path TEXT NOT NULL, destination VARCHAR(256) NOT NULL,
    state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, last_error TEXT NOT NULL,
    next_attempt_at TIMESTAMP NOT NULL, created_at TIMESTAMP NOT NULL, delivered_at TIMESTAMP,
    CONSTRAINT uq_outbox_dest UNIQUE (sop_instance_uid, destination))"""

OLD_ROW = """INSERT INTO outbox (study_uid, study_version, kind, sop_class_uid, sop_instance_uid,
    path, destination, state, attempts, last_error, next_attempt_at, created_at)
    VALUES ('1.2.3', 1, 'sr', '1.2', '1.2.3.8.1', '/x.dcm', :dest, 'pending', 1, 'refused',
    '2020-01-01 00:00:00.000000', '2020-01-01 00:00:00.000000')"""


def test_a_database_of_the_old_schema_opens_and_delivers(url: str, tmp_path: Path) -> None:
    engine = make_engine(url)
    pk = "INTEGER PRIMARY KEY" if engine.dialect.name == "sqlite" else "SERIAL PRIMARY KEY"
    with engine.begin() as conn:
        conn.execute(text(OLD_STUDIES.format(pk=pk)))
        conn.execute(text(OLD_OUTBOX.format(pk=pk)))
        conn.execute(text(OLD_ROW), {"dest": DEST.key})
    engine.dispose()

    ledger = StudyLedger(url)
    outbox = Outbox(ledger, OutboxSettings())
    again = StudyLedger(url)  # opening it again changes nothing
    Outbox(again, OutboxSettings())
    again.close()
    columns = {c["name"] for c in inspect(ledger.engine).get_columns("outbox")}
    assert {"lease_owner", "lease_until"} <= columns
    # the row queued by the old version is delivered
    (d,) = outbox.due()
    assert d.sop_instance_uid == "1.2.3.8.1" and d.attempts == 1
    assert outbox.mark_delivered(d.id)
    assert outbox.deliveries()[0].state is delivery.DeliveryState.DELIVERED
    # and a study runs through the leased state machine
    ledger.record_instance(
        InstanceHeader("1.2.3", "1.2.3.1", "1.2.3.1.1", CR_CLASS, EXPLICIT_LE),
        path="x", sha256="a" * 64, size_bytes=1, revision=1, calling_ae="T",
    )  # fmt: skip
    ledger.complete_quiet_studies(0)
    ledger.mark_queued("1.2.3", 1, "t")
    assert ledger.start_run("1.2.3", 1, owner="w1") is not None
    assert ledger.start_run("1.2.3", 1, owner="w2") is None
    assert ledger.finish("1.2.3", 1, ok=True).state is StudyState.DONE
    ledger.close()
