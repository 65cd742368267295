"""Batching (issue 13 item 4): a pre-read task claims other queued studies from the ledger and
runs them as one engine batch. Each study is finished once with its SR/SEG, a broken study
fails alone, a transient engine error gives the batch back for a retry, and a worker killed
mid-batch leaves every study of the batch to the reconciler."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from bench.nodeproc import ServerProcess
from node.ledger import InstanceHeader, StudyLedger, StudyState
from node.runtime import NodeRuntime
from node.synthetic import SyntheticImage, make_chest_radiograph, write_study
from tests.conftest import storescu, wait_for_state
from tests.peers import wait_for
from workers.engines.base import EngineError, EngineRequest, TransientEngineError
from workers.engines.demo import DemoEngine
from workers.preread import TransientPrereadError, run_preread

REPO = Path(__file__).resolve().parents[1]
DEAD_BROKER = "redis://127.0.0.1:9/0"  # nobody listens: studies stay queued
BATCH_LINE = re.compile(r"pre-read of study (\S+) v1 started \(batch of (\d+),")


class RecordingEngine(DemoEngine):
    """The demo engine, recording the size of every batch; it refuses (EngineError) any
    batch holding a request of a study in ``refuse``, or raises ``failure`` on every call."""

    def __init__(
        self, refuse: frozenset[str] = frozenset(), failure: Exception | None = None
    ) -> None:
        super().__init__()
        self.refuse = refuse
        self.failure = failure
        self.batches: list[int] = []

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        self.batches.append(len(requests))
        if self.failure is not None:
            raise self.failure
        if any(r.metadata.get("study_uid") in self.refuse for r in requests):
            raise EngineError("the engine refused this request")
        return super().generate(requests)


def radiograph(seed: int) -> SyntheticImage:
    return make_chest_radiograph(seed=seed, rows=256, cols=208)


def queue_studies(node: NodeRuntime, directory: Path, count: int, seed: int) -> list[str]:
    """``count`` one-image studies sent over one association; their UIDs once all are queued."""
    images = [radiograph(seed + i) for i in range(count)]
    files = [
        path for i, image in enumerate(images) for path in write_study(directory / str(i), [image])
    ]
    sent = storescu(node.scp.port, *files)
    assert sent.returncode == 0, sent.stderr
    uids = [str(image.dataset.StudyInstanceUID) for image in images]
    for uid in uids:
        wait_for_state(node, uid, {"queued"})
    return uids


def sr_files(node: NodeRuntime, uid: str) -> list[Path]:
    directory = node.settings.storage.results_path / uid
    return sorted(directory.glob("sr-*.dcm")) if directory.is_dir() else []


@pytest.fixture
def queued_node(node_factory: Callable[..., NodeRuntime]) -> NodeRuntime:
    """A node whose studies stay queued (no worker takes them), batches of up to 4."""
    return node_factory(embedded=False, queue={"broker_url": DEAD_BROKER, "max_batch": 4})


def test_a_task_runs_the_queued_studies_as_one_batch_each_finished_once(
    queued_node: NodeRuntime, tmp_path: Path
) -> None:
    node = queued_node
    uids = queue_studies(node, tmp_path / "in", 6, seed=300)
    engine = RecordingEngine()
    assert run_preread(node.settings, uids[0], 1, engine=engine) == "done"
    assert engine.batches == [4]  # the task's study and the 3 oldest others, one engine call
    states = {uid: node.ledger.get_study(uid).state for uid in uids}  # type: ignore[union-attr]
    assert [states[uid] for uid in uids] == [StudyState.DONE] * 4 + [StudyState.QUEUED] * 2
    # the claimed studies' own messages find them finished: nothing is run twice
    for uid in uids[1:4]:
        assert run_preread(node.settings, uid, 1, engine=engine) == "noop"
    assert engine.batches == [4]
    assert run_preread(node.settings, uids[4], 1, engine=engine) == "done"
    assert engine.batches == [4, 2]
    for uid in uids:
        study = node.ledger.get_study(uid)
        assert study is not None and study.state is StudyState.DONE, study
        assert study.result is not None and study.result.outputs is not None
        assert study.result.findings  # the demo engine found the phantom's nodules
        assert study.run_owner is None and study.run_lease_until is None
        assert len(sr_files(node, uid)) == 1


def test_max_batch_1_runs_one_study_per_task(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = node_factory(embedded=False, queue={"broker_url": DEAD_BROKER, "max_batch": 1})
    uids = queue_studies(node, tmp_path / "in", 3, seed=310)
    engine = RecordingEngine()
    assert run_preread(node.settings, uids[1], 1, engine=engine) == "done"
    assert engine.batches == [1]
    assert [node.ledger.get_study(u).state for u in uids] == [  # type: ignore[union-attr]
        StudyState.QUEUED,
        StudyState.DONE,
        StudyState.QUEUED,
    ]


def test_a_broken_image_and_a_refused_request_fail_only_their_studies(
    queued_node: NodeRuntime, tmp_path: Path
) -> None:
    node = queued_node
    uids = queue_studies(node, tmp_path / "in", 4, seed=320)
    broken, refused = uids[1], uids[2]
    (instance,) = node.ledger.instances_of(broken)
    spooled = node.settings.storage.spool_path / instance.path
    spooled.write_bytes(spooled.read_bytes()[: spooled.stat().st_size // 2])  # cut mid-pixels
    engine = RecordingEngine(refuse=frozenset({refused}))
    assert run_preread(node.settings, uids[0], 1, engine=engine) == "done"
    # one batch of the 3 readable studies, refused, then each of them alone
    assert engine.batches == [3, 1, 1, 1]
    by_uid = {uid: node.ledger.get_study(uid) for uid in uids}
    assert by_uid[broken].state is StudyState.FAILED  # type: ignore[union-attr]
    assert "image" in by_uid[broken].reason  # type: ignore[union-attr]
    assert by_uid[refused].state is StudyState.FAILED  # type: ignore[union-attr]
    assert by_uid[refused].reason == "engine error: the engine refused this request"  # type: ignore[union-attr]
    for uid in (uids[0], uids[3]):
        assert by_uid[uid].state is StudyState.DONE  # type: ignore[union-attr]
        assert len(sr_files(node, uid)) == 1
    assert sr_files(node, broken) == [] and sr_files(node, refused) == []


def test_an_engine_that_cannot_load_fails_the_tasks_study_alone(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    node = node_factory(
        embedded=False,
        queue={"broker_url": DEAD_BROKER, "max_batch": 4},
        engine={"name": "medgemma", "model": str(tmp_path / "no-such-model"), "device": "cpu"},
    )
    uids = queue_studies(node, tmp_path / "in", 3, seed=325)
    assert run_preread(node.settings, uids[0], 1) == "failed"
    failed = node.ledger.get_study(uids[0])
    assert failed is not None and "does not exist" in failed.reason
    # nothing else was claimed: another (healthy) worker may still read them
    for uid in uids[1:]:
        assert node.ledger.get_study(uid).state is StudyState.QUEUED  # type: ignore[union-attr]


def test_a_transient_engine_error_gives_the_batch_back_and_the_retry_takes_it_again(
    queued_node: NodeRuntime, tmp_path: Path
) -> None:
    node = queued_node
    uids = queue_studies(node, tmp_path / "in", 3, seed=330)
    busy = RecordingEngine(failure=TransientEngineError("GPU busy"))
    with pytest.raises(TransientPrereadError, match="GPU busy"):
        run_preread(node.settings, uids[0], 1, engine=busy)
    assert busy.batches == [3, 1, 1, 1]  # the batch, then each request alone
    for uid in uids:  # still running, but free for the retry (no lease held)
        study = node.ledger.get_study(uid)
        assert study is not None and study.state is StudyState.RUNNING
        assert study.run_owner is None and study.run_lease_until is None
    engine = RecordingEngine()
    assert run_preread(node.settings, uids[0], 1, engine=engine) == "done"  # the task's retry
    assert engine.batches == [3]
    for uid in uids:
        assert node.ledger.get_study(uid).state is StudyState.DONE  # type: ignore[union-attr]
        assert len(sr_files(node, uid)) == 1


def test_a_time_limit_mid_batch_leaves_every_study_to_the_reconciler(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    queue = {"broker_url": DEAD_BROKER, "max_batch": 4, "run_lease_seconds": 1}
    node = node_factory(embedded=False, queue=queue)
    uids = queue_studies(node, tmp_path / "in", 3, seed=335)
    with pytest.raises(SoftTimeLimitExceeded):  # Celery's soft limit, raised in the engine
        run_preread(
            node.settings, uids[0], 1, engine=RecordingEngine(failure=SoftTimeLimitExceeded())
        )
    for uid in uids:  # nothing recorded as failed or done: no longer renewed, the leases end
        study = node.ledger.get_study(uid)
        assert study is not None and study.state is StudyState.RUNNING and study.run_owner
    time.sleep(1.2)
    stuck = {s.study_uid for s in node.ledger.stuck_studies(older_than_seconds=3600)}
    assert stuck == set(uids)  # the reconciler re-sends every one now


def test_serve_batches_studies_that_queue_while_its_worker_is_busy(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="medgemma.preread")
    node = node_factory(queue={"max_batch": 3}, engine={"name": "demo", "demo_delay_seconds": 6})
    first = radiograph(340)
    (path,) = write_study(tmp_path / "first", [first])
    assert storescu(node.scp.port, path).returncode == 0
    wait_for_state(node, str(first.dataset.StudyInstanceUID), {"running"}, timeout=30)
    # three more arrive while the embedded worker reads the first one
    others = [radiograph(341 + i) for i in range(3)]
    files = [p for i, im in enumerate(others) for p in write_study(tmp_path / str(i), [im])]
    assert storescu(node.scp.port, *files).returncode == 0
    uids = [str(im.dataset.StudyInstanceUID) for im in [first, *others]]
    for uid in uids:
        study = wait_for_state(node, uid, {"done", "failed"}, timeout=60)
        assert study.state is StudyState.DONE, study.reason
        assert len(sr_files(node, uid)) == 1
    batches = {uid: int(size) for uid, size in BATCH_LINE.findall(caplog.text)}
    # the first ran alone; the next task took two of the others with it (max_batch 3)
    assert len(batches) == 3 and set(batches.values()) == {3}, caplog.text
    for uid in uids:
        assert caplog.text.count(f"pre-read of study {uid} v1 started") == 1


# ----------------------------------------------------------------- Celery workers


def _worker(
    node_process: Callable[..., ServerProcess],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
    name: str,
    **settings: str,
) -> ServerProcess:
    env = {
        "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
        "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
        "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        **{f"MEDGEMMA_NODE_{key.upper()}": value for key, value in settings.items()},
    }
    command = ["worker", "--concurrency", "1", "--hostname", f"{name}@%h"]
    proc: ServerProcess = node_process(
        command, env=env, ready=lambda p: p.log_has(" ready."), what=f"worker {name} ready"
    )
    return proc


def test_a_celery_worker_runs_studies_queued_while_it_was_stopped_in_batches(
    node_factory: Callable[..., NodeRuntime],
    node_process: Callable[..., ServerProcess],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    node = node_factory(embedded=False, queue={"broker_url": redis_url, **queues})
    uids = queue_studies(node, tmp_path / "in", 5, seed=350)
    worker = _worker(node_process, redis_url, queues, tmp_path, "batch", queue__max_batch="3")
    for uid in uids:
        study = wait_for_state(node, uid, {"done", "failed"}, timeout=90)
        assert study.state is StudyState.DONE, (study.reason, worker.describe())
        assert study.result is not None and study.result.outputs is not None
        assert len(sr_files(node, uid)) == 1
    output = worker.output()
    batches = [int(size) for _, size in BATCH_LINE.findall(output)]
    assert batches and max(batches) == 3, output  # all 5 were waiting: the first task took 3
    for uid in uids:
        assert output.count(f"pre-read of study {uid} v1 started") == 1, output
    # every message is acknowledged: the claimed studies' own messages return 'noop'
    wait_for(lambda: worker.output().count("succeeded in") >= 5, 30, 0.2, "5 messages handled")


def test_a_celery_worker_killed_mid_batch_leaves_every_study_to_the_reconciler(
    node_factory: Callable[..., NodeRuntime],
    node_process: Callable[..., ServerProcess],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    lease = 4
    node = node_factory(
        embedded=False,
        queue={
            "broker_url": redis_url,
            "run_lease_seconds": lease,
            "reconcile_interval_seconds": 0.5,
            **queues,
        },
    )
    uids = queue_studies(node, tmp_path / "in", 3, seed=360)
    common = {"queue__max_batch": "4", "queue__run_lease_seconds": str(lease)}
    first = _worker(
        node_process, redis_url, queues, tmp_path, "first",
        engine__demo_delay_seconds="120", **common,
    )  # fmt: skip
    running = [wait_for_state(node, uid, {"running"}, timeout=60) for uid in uids]
    assert len({study.run_owner for study in running}) == 1  # one batch, one owner
    second = _worker(node_process, redis_url, queues, tmp_path, "second", **common)
    time.sleep(lease)  # the first worker renews every lease of its batch meanwhile
    for study in running:
        now = node.ledger.get_study(study.study_uid)
        assert now is not None and now.state is StudyState.RUNNING
        assert now.attempts == study.attempts  # not re-sent
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker: main process and pool child
    first.process.wait(10)
    killed_at = time.monotonic()
    for study in running:
        done = wait_for_state(node, study.study_uid, {"done"}, timeout=60)
        assert done.attempts == study.attempts + 1  # re-sent once by the reconciler
        assert done.result is not None and done.result.outputs is not None
        assert len(sr_files(node, study.study_uid)) == 1
    assert time.monotonic() - killed_at < lease + 40
    for uid in uids:
        assert second.output().count(f"pre-read of study {uid} v1 started") == 1


# ----------------------------------------------------------------- the ledger's claims


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StudyLedger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    ledger = StudyLedger(url)
    yield ledger
    ledger.close()


def _queue(ledger: StudyLedger, study: str, sop: str) -> None:
    header = InstanceHeader(
        study, f"{study}.1", sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1"
    )
    ledger.record_instance(
        header, path=f"{sop}.dcm", sha256=sop.ljust(64, "0")[:64], size_bytes=1, revision=1,
        calling_ae="A",
    )  # fmt: skip
    (complete,) = ledger.complete_quiet_studies(0)
    ledger.mark_queued(study, complete.version, f"task-{sop}")


def test_two_workers_claiming_at_once_never_take_the_same_study(ledger: StudyLedger) -> None:
    for i in range(12):
        _queue(ledger, f"1.2.{i}", f"1.2.{i}.1.1")
    claims: dict[str, list[str]] = {}
    start = threading.Barrier(3)

    def claim(owner: str) -> None:
        start.wait()
        claims[owner] = [s.study_uid for s in ledger.claim_runs(5, owner)]

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    taken = [uid for uids in claims.values() for uid in uids]
    assert len(taken) == len(set(taken)) == 12  # each study once, none left behind
    for owner, uids in claims.items():
        for uid in uids:
            study = ledger.get_study(uid)
            assert study is not None and study.state is StudyState.RUNNING
            assert study.run_owner == owner


def test_a_later_version_waits_for_the_earlier_one_and_dead_runs_are_the_reconcilers(
    ledger: StudyLedger,
) -> None:
    _queue(ledger, "1.2.3", "1.2.3.1.1")
    _queue(ledger, "1.2.3", "1.2.3.1.2")  # version 2 of the same study
    _queue(ledger, "1.2.4", "1.2.4.1.1")
    assert ledger.start_run("1.2.4", 1, owner="dead", lease_seconds=0.01) is not None
    time.sleep(0.05)  # its worker died: the lease ran out
    claimed = [(s.study_uid, s.version) for s in ledger.claim_runs(8, "w1")]
    assert claimed == [("1.2.3", 1)]  # not v2 (v1 unfinished), not the dead run
    ledger.finish("1.2.3", 1, ok=True, owner="w1")
    assert [(s.study_uid, s.version) for s in ledger.claim_runs(8, "w1")] == [("1.2.3", 2)]


# ----------------------------------------------------------------- the benchmark


def test_the_batching_benchmark_runs_every_study_through_the_worker(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "worker_batch.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "worker_batch.py"), "--batch", "1", "2",
         "--studies", "3", "--new-tokens", "2", "--repeats", "1", "--rows", "256",
         "--cols", "208", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "NOT MedGemma" in report["model"]
    rows = {row["batch"]: row for row in report["results"]}
    assert sorted(rows) == [1, 2]
    # every study went through the worker in batches of at most B; the peer ran them all
    assert rows[1]["worker_runs"][0]["engine_batches"] == [1, 1, 1]
    assert rows[2]["worker_runs"][0]["engine_batches"] == [2, 1]
    assert rows[2]["engine_replays"][0]["studies"] == 3
    assert "worker/engine" in completed.stdout
