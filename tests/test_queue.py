"""Queueing through a real Redis to a real Celery worker, and the reconciler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from bench.nodeproc import ServerProcess
from node.completion import StudyCoordinator
from node.dispatch import CeleryDispatcher, preread_task_id
from node.runtime import NodeRuntime
from node.synthetic import make_chest_radiograph, write_study
from tests.conftest import node_cli, storescu, wait_for_state
from tests.peers import free_port, wait_for
from tests.test_preread import assert_matches_phantom

SMALL = {"rows": 256, "cols": 208}


def test_study_goes_through_redis_to_a_celery_worker(
    node_factory: Callable[..., NodeRuntime],
    worker_factory: Callable[[], ServerProcess],
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
    worker_factory: Callable[[], ServerProcess],
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
    # the second delivery is taken and acknowledged too, without running the pre-read again
    wait_for(lambda: worker.output().count("succeeded") >= 2, 30, 0.2, "both deliveries handled")
    assert worker.output().count("started") == 1, worker.describe()
    assert f"study {uid} v1 finished or running elsewhere: nothing to do" in worker.output()
    assert "succeeded in" in worker.output() and ": 'noop'" in worker.output()
    assert node.ledger.get_study(uid) == done  # unchanged by the second delivery


def test_broker_down_then_reconciler_requeues(
    node_factory: Callable[..., NodeRuntime],
    worker_factory: Callable[[], ServerProcess],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    node = node_factory(embedded=False, queue={"broker_url": dead_broker, **queues})
    image = make_chest_radiograph(seed=23, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    sent = storescu(node.scp.port, path)
    assert sent.returncode == 0, sent.stderr  # storing never depends on the broker
    uid = image.dataset.StudyInstanceUID
    stuck = wait_for_state(node, uid, {"queued"})
    wait_for(
        lambda: f"study {uid} v1 stays queued, the reconciler will re-send it" in caplog.text,
        10, 0.1, "the failed broker send to be logged",
    )  # fmt: skip
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
    env = {
        "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_ENGINE__NAME": "medgemma",
        "MEDGEMMA_NODE_ENGINE__MODEL": str(tmp_path / "no-such-model"),
    }
    result = node_cli(env, "worker", timeout=120)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "hf download" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_without_a_broker_says_how_to_set_it(tmp_path: Path) -> None:
    result = node_cli({}, "worker", cwd=tmp_path)
    assert result.returncode == 2
    assert "MEDGEMMA_NODE_QUEUE__BROKER_URL" in result.stderr
