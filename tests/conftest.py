"""Shared fixtures: real peers (tests/peers.py), a node running in this process on a free
port, node subprocesses (``medgemma-node <command>``, bench/nodeproc.py) and Celery
workers on test-only queues."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from bench.nodeproc import ServerProcess, node_argv, node_environment, start_node
from node.ledger import StudySummary
from node.runtime import NodeRuntime
from node.settings import Settings, load_settings
from node.synthetic import SyntheticImage, write_study
from tests.peers import *  # noqa: F403
from tests.peers import dcmtk, free_port, wait_for


def make_settings(tmp_path: Path, **sections: object) -> Settings:
    """Settings for a test node: data in tmp_path, a free loopback port, short quiet period."""
    base: dict[str, object] = {
        "dicom": {"bind_address": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(tmp_path / "var"), "min_free_mb": 0},
        "completion": {"quiet_seconds": 1.5, "poll_seconds": 0.1},
        "engine": {"name": "demo"},
    }
    for name, values in sections.items():
        current = base.get(name)
        if isinstance(current, dict) and isinstance(values, dict):
            current.update(values)
        else:
            base[name] = values
    return load_settings(None, **base)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeRuntime]]:
    """Start NodeRuntime instances (embedded worker unless a broker is configured)."""
    started: list[NodeRuntime] = []

    def start(embedded: bool = True, **sections: object) -> NodeRuntime:
        runtime = NodeRuntime(make_settings(tmp_path, **sections), embedded=embedded)
        runtime.start()
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        runtime.stop()


@pytest.fixture
def node(node_factory: Callable[..., NodeRuntime]) -> NodeRuntime:
    return node_factory()


def wait_for_state(
    runtime: NodeRuntime, study_uid: str, states: set[str], timeout: float = 30.0
) -> StudySummary:
    """Wait until the latest version of a study is in one of ``states``."""
    last: list[StudySummary | None] = [None]

    def reached() -> StudySummary | None:
        last[0] = study = runtime.ledger.get_study(study_uid)
        return study if study is not None and study.state.value in states else None

    try:
        study = wait_for(reached, timeout, 0.1, f"study {study_uid} in {sorted(states)}")
        assert study is not None  # wait_for returns only a truthy value
        return study
    except AssertionError as exc:
        seen = last[0]
        raise AssertionError(
            f"{exc} (last: {seen.state.value if seen else 'absent'}, {seen.reason if seen else ''})"
        ) from None


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``medgemma-node <command>`` subprocesses (bench.nodeproc.start_node), each
    ready when its condition holds, its log under tmp_path; all stopped after the test."""
    started: list[ServerProcess] = []

    def start(
        command: Sequence[str],
        *,
        ready: Callable[[ServerProcess], Callable[[], bool]] | None,
        what: str,
        env: Mapping[str, str] | None = None,
        config: Path | None = None,
        timeout: float = 60.0,
    ) -> ServerProcess:
        log = tmp_path / f"{command[0]}-{len(started)}.log"
        proc = start_node(
            command, log=log, ready=ready, what=what, env=env, config=config, timeout=timeout
        )
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def node_cli(
    env: Mapping[str, str], *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``medgemma-node <args>`` to completion with the MEDGEMMA_NODE_* settings ``env``
    (and no others from this process's environment)."""
    return subprocess.run(
        node_argv(args), env=node_environment(env), capture_output=True, text=True,
        timeout=timeout, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def queues(redis_url: str) -> dict[str, str]:
    """Queue names of this test only, so leftover messages of other tests never interfere."""
    tag = secrets.token_hex(4)
    return {"preread_queue": f"preread-{tag}", "followup_queue": f"followup-{tag}"}


@pytest.fixture
def worker_factory(
    node_process: Callable[..., ServerProcess],
    tmp_path: Path,
    redis_url: str,
    queues: dict[str, str],
) -> Callable[[], ServerProcess]:
    """Start ``medgemma-node worker`` processes (demo engine, concurrency 1) on this test's
    queues and Redis; each is ready when Celery logs "ready"."""

    def start() -> ServerProcess:
        env = {
            "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
            "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
            "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
            "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
            "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        }
        command = ["worker", "--concurrency", "1", "--hostname", f"test-{secrets.token_hex(3)}@%h"]
        return node_process(
            command, env=env, ready=lambda p: p.log_has(" ready."), what="Celery worker ready"
        )

    return start


def storescu(
    port: int, *files: Path, calling: str = "STORESCU", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu of files to the node at 127.0.0.1:port, over one association."""
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", "MEDGEMMA", *extra, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )


def send_study(
    runtime: NodeRuntime, directory: Path, images: list[SyntheticImage], *flags: str
) -> None:
    """Write images to directory and storescu them to the node; the send must succeed."""
    result = storescu(runtime.scp.port, *write_study(directory, images), extra=flags)
    assert result.returncode == 0, result.stderr
