"""Queueing through a real Redis to a real Celery worker, and the reconciler."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from node.completion import StudyCoordinator
from node.dispatch import CeleryDispatcher, preread_task_id
from node.runtime import NodeRuntime
from node.synthetic import make_chest_radiograph, write_study
from tests.conftest import storescu, wait_for_state
from tests.peers import free_port
from tests.test_preread import assert_matches_phantom

SMALL = {"rows": 256, "cols": 208}


class Worker:
    def __init__(self, process: subprocess.Popen[str], log: Path) -> None:
        self.process = process
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def queues(redis_url: str) -> dict[str, str]:
    """Queue names of this test only, so leftover messages of other tests never interfere."""
    tag = secrets.token_hex(4)
    return {"preread_queue": f"preread-{tag}", "followup_queue": f"followup-{tag}"}


@pytest.fixture
def worker_factory(
    tmp_path: Path, redis_url: str, queues: dict[str, str]
) -> Iterator[Callable[[], Worker]]:
    workers: list[Worker] = []

    def start() -> Worker:
        env = dict(os.environ)
        env.update(
            MEDGEMMA_NODE_QUEUE__BROKER_URL=redis_url,
            MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE=queues["preread_queue"],
            MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE=queues["followup_queue"],
            MEDGEMMA_NODE_STORAGE__DATA_DIR=str(tmp_path / "var"),
            MEDGEMMA_NODE_ENGINE__NAME="demo",
        )
        log = tmp_path / f"worker-{len(workers)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "worker", "--concurrency", "1",
             "--hostname", f"test-{secrets.token_hex(3)}@%h"],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        worker = Worker(process, log)
        workers.append(worker)
        deadline = time.monotonic() + 60
        while "ready" not in worker.output():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Celery worker did not start:\n{worker.output()}")
            time.sleep(0.2)
        return worker

    yield start
    for w in workers:
        if w.process.poll() is None:
            os.killpg(w.process.pid, signal.SIGTERM)
            try:
                w.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(w.process.pid, signal.SIGKILL)


def test_study_goes_through_redis_to_a_celery_worker(
    node_factory: Callable[..., NodeRuntime],
    worker_factory: Callable[[], Worker],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    worker = worker_factory()
    node = node_factory(embedded=False, queue={"broker_url": redis_url, **queues})
    image = make_chest_radiograph(seed=21, rows=1250, cols=1024)
    (path,) = write_study(tmp_path / "in", [image])
    sent = storescu(node.scp.port, path)
    assert sent.returncode == 0, sent.stderr
    study = wait_for_state(node, image.dataset.StudyInstanceUID, {"done", "failed"}, timeout=90)
    assert study.state.value == "done", (study.reason, worker.output())
    assert study.task_id == preread_task_id(study.study_uid, 1)
    assert f"medgemma.preread[{study.task_id}]" in worker.output()
    # the broker queue is empty again: the message was acknowledged
    assert redis.Redis.from_url(redis_url).llen(queues["preread_queue"]) == 0
    # the worker's demo engine found the phantom's nodules as anchors (IoU >= 0.5)
    assert study.result is not None
    assert_matches_phantom(study.result, image)


def test_redelivered_task_does_no_double_work(
    node_factory: Callable[..., NodeRuntime],
    worker_factory: Callable[[], Worker],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    node = node_factory(embedded=False, queue={"broker_url": redis_url, **queues})
    image = make_chest_radiograph(seed=22, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = image.dataset.StudyInstanceUID
    wait_for_state(node, uid, {"queued"})
    # the same task sent a second time (a broker redelivery) before any worker runs
    node.dispatcher.send_preread(uid, 1)
    worker = worker_factory()
    done = wait_for_state(node, uid, {"done"}, timeout=90)
    deadline = time.monotonic() + 30
    while worker.output().count("succeeded") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.output().count("started") == 1, worker.output()
    assert "already finished: nothing to do" in worker.output()
    assert node.ledger.get_study(uid) == done  # unchanged by the second delivery


def test_broker_down_then_reconciler_requeues(
    node_factory: Callable[..., NodeRuntime],
    worker_factory: Callable[[], Worker],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    node = node_factory(embedded=False, queue={"broker_url": dead_broker, **queues})
    image = make_chest_radiograph(seed=23, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    sent = storescu(node.scp.port, path)
    assert sent.returncode == 0, sent.stderr  # storing never depends on the broker
    uid = image.dataset.StudyInstanceUID
    stuck = wait_for_state(node, uid, {"queued"})
    time.sleep(1.5)  # the broker send was attempted and failed; still queued
    assert node.ledger.get_study(uid).state.value == "queued"  # type: ignore[union-attr]

    # the broker is back (the real one) and a worker runs: the reconciler re-sends
    worker_factory()
    coordinator = StudyCoordinator(
        node.settings, node.ledger, CeleryDispatcher(redis_url, queues["preread_queue"])
    )
    resent = coordinator.reconcile(older_than_seconds=0)
    assert [s.study_uid for s in resent] == [uid]
    done = wait_for_state(node, uid, {"done"}, timeout=90)
    assert done.attempts == stuck.attempts + 1


def test_reconciler_gives_up_after_max_attempts(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path, queues: dict[str, str]
) -> None:
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    node = node_factory(
        embedded=False, queue={"broker_url": dead_broker, "max_attempts": 2, **queues}
    )
    image = make_chest_radiograph(seed=24, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    sent = storescu(node.scp.port, path)
    assert sent.returncode == 0, sent.stderr
    uid = image.dataset.StudyInstanceUID
    wait_for_state(node, uid, {"queued"})
    node.coordinator.reconcile(older_than_seconds=0)  # attempt 2
    node.coordinator.reconcile(older_than_seconds=0)  # gives up
    failed = wait_for_state(node, uid, {"failed"}, timeout=5)
    assert "gave up after 2 attempts" in failed.reason


def test_worker_with_a_missing_model_refuses_to_start(tmp_path: Path, redis_url: str) -> None:
    env = dict(os.environ)
    env.update(
        MEDGEMMA_NODE_QUEUE__BROKER_URL=redis_url,
        MEDGEMMA_NODE_STORAGE__DATA_DIR=str(tmp_path / "var"),
        MEDGEMMA_NODE_ENGINE__NAME="medgemma",
        MEDGEMMA_NODE_ENGINE__MODEL=str(tmp_path / "no-such-model"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "worker"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "hf download" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_without_a_broker_says_how_to_set_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_NODE_")}
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "worker"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "MEDGEMMA_NODE_QUEUE__BROKER_URL" in result.stderr
