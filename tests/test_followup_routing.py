"""Follow-ups go to the worker that holds their study's image prefix, and fall back.

The database rules (node.affinity, node.fhir.followups) first, then real Celery workers on a
real Redis: a question is answered by the worker holding its study; when that worker is
killed, the question it was sent is answered by another worker, once, and the killed
worker's stale message does nothing when it comes back.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.nodeproc import ServerProcess
from node.affinity import WorkerRegistry
from node.dispatch import CeleryDispatcher
from node.fhir.auth import Principal
from node.fhir.followups import (
    FollowupPublisher,
    FollowupRouting,
    assign_route,
    create_followup,
    followup,
    reroute_followups,
    start_followup,
)
from node.fhir.models import FollowupState
from node.fhir.projection import record_preread
from node.fhir.questions import Question, build_question
from node.fhir.resources import IdentifierSystems, report_id
from node.fhir.store import FhirStore
from node.ledger import StudyLedger
from node.runtime import NodeRuntime
from node.synthetic import make_chest_radiograph, write_study
from node.turns import DialogueLog
from tests.conftest import storescu, wait_for_state
from tests.peers import wait_for
from tests.test_fhir_resources import add_study
from workers.affinity import sync_held_studies
from workers.engines.base import held_studies
from workers.engines.demo import DemoEngine

PRINCIPAL = Principal("ris", "token", frozenset())


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StudyLedger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    ledger = StudyLedger(url)
    yield ledger
    ledger.close()


def ask(store: FhirStore, study_uid: str, text: str = "Is A1 larger than 5 mm?") -> str:
    """Store a question about the study's report (a queued job); its id."""
    report = store.get("DiagnosticReport", report_id(study_uid))
    assert report is not None
    question = build_question(report, Question(text, "", ""), "", PRINCIPAL)
    job = create_followup(
        store, question, report_id=report.id, study_uid=study_uid, language="", anchor_ref=""
    )
    return job.id


def state_of(store: FhirStore, job_id: str) -> tuple[str, str | None]:
    job = followup(store, job_id)
    assert job is not None
    return job.state.value, job.route


# ------------------------------------------------------------------ database rules


def test_the_holder_is_chosen_only_alive_idle_and_on_the_follow_up_queue(
    ledger: StudyLedger,
) -> None:
    registry = WorkerRegistry(ledger.engine, heartbeat_seconds=0.2)
    registry.note_study("1.2.3", "a@h")
    assert registry.holder("1.2.3", "followup") == ""  # a never beat: not known alive
    registry.beat("a@h", ["preread", "followup", "a@h.dq2"])
    assert registry.holder("1.2.3", "followup") == "a@h"
    assert registry.holder("1.2.4", "followup") == ""  # nobody holds that study
    assert registry.holder("1.2.3", "other") == ""  # a does not take follow-ups there
    registry.set_busy("a@h", True)
    assert registry.holder("1.2.3", "followup") == ""  # busy: the question would wait
    registry.set_busy("a@h", False)
    assert registry.holder("1.2.3", "followup") == "a@h"
    time.sleep(0.7)  # three missed beats
    assert not registry.alive("a@h") and registry.holder("1.2.3", "followup") == ""
    registry.beat("a@h", ["followup"])
    assert registry.alive("a@h")
    registry.leave("a@h")  # a clean stop: gone at once
    assert not registry.alive("a@h")
    # another worker takes the study over; an eviction by the first does not remove it
    registry.beat("b@h", ["followup"])
    registry.note_study("1.2.3", "b@h")
    registry.forget_study("1.2.3", "a@h")
    assert registry.holder("1.2.3", "followup") == "b@h"


def test_a_worker_records_the_studies_its_engine_holds_and_forgets_evicted_ones(
    ledger: StudyLedger,
) -> None:
    registry = WorkerRegistry(ledger.engine)
    registry.beat("a@h", ["followup"])
    sync_held_studies(registry, "a@h", ["1.2.1", "1.2.2"])
    assert [registry.holder(s, "followup") for s in ("1.2.1", "1.2.2")] == ["a@h", "a@h"]
    sync_held_studies(registry, "a@h", ["1.2.2", "1.2.3"])  # 1.2.1 evicted
    assert [registry.holder(s, "followup") for s in ("1.2.1", "1.2.3")] == ["", "a@h"]
    sync_held_studies(registry, "a@h", [])
    assert held_studies(DemoEngine()) == []  # an engine without a prefix cache holds none


def test_a_routed_question_runs_once_wherever_it_ends_up(ledger: StudyLedger) -> None:
    store = FhirStore(ledger)
    uid = add_study(ledger)
    record_preread(ledger, uid, 1, systems=IdentifierSystems())
    alive = {"a@h": True}

    def gone(worker: str) -> bool:
        return not alive.get(worker, False)

    # sent to a; a has not started it in time: re-routed to the shared queue, once
    late = ask(store, uid)
    assert assign_route(store, late, "a@h") == "a@h"
    assert assign_route(store, late, "b@h") == "a@h"  # decided once
    assert reroute_followups(store, wait_seconds=3600, gone=gone) == []  # not late yet
    store_sent(store, late, seconds_ago=60)
    assert reroute_followups(store, wait_seconds=30, gone=gone) == [late]
    assert state_of(store, late) == ("queued", "")
    assert assign_route(store, late, "a@h") == ""  # never routed to a worker again
    assert start_followup(store, late, "a@h") is None  # a's stale message does nothing
    started = start_followup(store, late, "")
    assert started is not None and started.state is FollowupState.RUNNING
    assert started.attempts == 1

    # running on a when a goes: queued again for the shared queue
    dropped = ask(store, uid)
    assign_route(store, dropped, "a@h")
    assert start_followup(store, dropped, "a@h") is not None
    assert reroute_followups(store, wait_seconds=0, gone=gone) == []  # a alive and running
    alive["a@h"] = False
    assert reroute_followups(store, wait_seconds=0, gone=gone) == [dropped]
    assert state_of(store, dropped) == ("queued", "")
    assert start_followup(store, dropped, "a@h") is None  # a's redelivered message
    assert start_followup(store, dropped, "") is not None

    # a question that a worker started is never moved, even when late
    taken = ask(store, uid)
    assign_route(store, taken, "b@h")
    store_sent(store, taken, seconds_ago=60)
    alive["b@h"] = True
    assert start_followup(store, taken, "b@h") is not None
    assert reroute_followups(store, wait_seconds=30, gone=gone) == []
    assert state_of(store, taken) == ("running", "b@h")

    # a question stored before routing existed (no route) runs from the shared queue
    legacy = ask(store, uid)
    assert start_followup(store, legacy, "") is not None


def store_sent(store: FhirStore, job_id: str, seconds_ago: float) -> None:
    """Mark a job as handed to the queue ``seconds_ago`` (what the publisher records)."""
    from datetime import timedelta

    from sqlalchemy import update

    from node.db import utcnow
    from node.fhir.models import FollowupRow

    with store.db.transaction() as s:
        s.execute(
            update(FollowupRow)
            .where(FollowupRow.id == job_id)
            .values(sent_at=utcnow() - timedelta(seconds=seconds_ago))
        )


# ------------------------------------------------------------------ real Celery workers


def _kill_group(proc: ServerProcess) -> None:
    """SIGKILL the worker and its pool (a crash: no clean shutdown runs)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.process.wait(10)


def test_follow_ups_reach_the_holder_and_survive_its_death(
    node_factory: Callable[..., NodeRuntime],
    node_process: Callable[..., ServerProcess],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    heartbeat, wait = 2.0, 3.0  # a killed worker is gone after 3 missed beats (6 s)
    node = node_factory(embedded=False, queue={"broker_url": redis_url, **queues})
    tag = secrets.token_hex(3)

    def worker(name: str) -> ServerProcess:
        env = {
            "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
            "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
            "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
            "MEDGEMMA_NODE_QUEUE__WORKER_HEARTBEAT_SECONDS": str(heartbeat),
            "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
            "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        }
        command = ["worker", "--concurrency", "1", "--hostname", f"{name}-{tag}@%h"]
        proc: ServerProcess = node_process(
            command, env=env, ready=lambda p: p.log_has(" ready."), what=f"worker {name} ready"
        )
        return proc

    holder_name = f"a-{tag}@{socket.gethostname()}"
    a, b = worker("a"), worker("b")
    image = make_chest_radiograph(seed=71, rows=512, cols=416)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = image.dataset.StudyInstanceUID
    study = wait_for_state(node, uid, {"done", "failed"}, timeout=90)
    assert study.state.value == "done", (study.reason, a.describe(), b.describe())

    store = FhirStore(node.ledger)
    registry = WorkerRegistry(node.ledger.engine, heartbeat_seconds=heartbeat)
    wait_for(lambda: registry.alive(holder_name), 10, 0.1, "worker a's heartbeat")
    # the demo engine keeps no prefixes: say that a holds the study, as a worker with the
    # transformers engine records it after reading it
    registry.note_study(uid, holder_name)
    # idle once its pre-read task (if it ran it) has ended, a little after the study is done
    wait_for(lambda: registry.holder(uid, queues["followup_queue"]), 10, 0.05, "a idle")
    publisher = FollowupPublisher(
        store,
        CeleryDispatcher(redis_url, queues["preread_queue"], queues["followup_queue"]),
        routing=FollowupRouting(registry, queues["followup_queue"], wait),
    )
    turns = DialogueLog(node.ledger.engine)

    def answered(job_id: str) -> Any:
        job = followup(store, job_id)
        return job if job is not None and job.finished else None

    try:
        first = ask(store, uid)
        publisher.publish(first)
        job = wait_for(lambda: answered(first), 60, 0.1, "the first question answered")
        assert job.state is FollowupState.ANSWERED and job.route == holder_name
        assert f"follow-up {first} answered" in a.output()
        assert f"follow-up {first}" not in b.output()

        # idle again: the answer is committed a little before the worker's task ends (in
        # CI, a killed right after the answer was once still busy, so the second question
        # went to the shared queue at once and never had a route)
        wait_for(lambda: registry.holder(uid, queues["followup_queue"]), 10, 0.05, "a idle")
        # a dies; a question sent to it before its heartbeat runs out is answered by b
        _kill_group(a)
        second = ask(store, uid, "Where is A2?")
        publisher.publish(second)
        routed = wait_for(lambda: state_of(store, second)[1], 10, 0.05, "the second routed")
        assert routed == holder_name  # its heartbeat has not run out yet
        job = wait_for(lambda: answered(second), 60, 0.1, "the second question answered")
        assert job.state is FollowupState.ANSWERED and job.route == ""
        assert f"follow-up {second} answered" in b.output()
        assert [t.question_id for t in turns.turns_of(uid)] == [first, second]  # once each
    finally:
        publisher.close()

    # a comes back under its name; the message it was sent (it held it unacknowledged when
    # it died: Redis gives it back after the visibility timeout) arrives: it does nothing
    back = worker("a")
    dispatcher = CeleryDispatcher(redis_url, queues["preread_queue"], queues["followup_queue"])
    try:
        dispatcher.send_followup(second, holder_name)
        wait_for(
            lambda: f"follow-up {second} already answered, unknown or re-routed" in back.output(),
            30, 0.1, "the stale message taken and dropped",
        )  # fmt: skip
    finally:
        dispatcher.close()
    assert [t.question_id for t in turns.turns_of(uid)] == [first, second]
    assert answered(second).route == ""
