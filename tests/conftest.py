"""Shared fixtures: real peers (tests/peers.py) and a node running on a free port."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.ledger import StudySummary
from node.runtime import NodeRuntime
from node.settings import Settings, load_settings
from node.synthetic import SyntheticImage, write_study
from tests.peers import *  # noqa: F403
from tests.peers import dcmtk, free_port


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
    deadline = time.monotonic() + timeout
    last: StudySummary | None = None
    while time.monotonic() < deadline:
        last = runtime.ledger.get_study(study_uid)
        if last is not None and last.state.value in states:
            return last
        time.sleep(0.1)
    raise AssertionError(
        f"study {study_uid} not in {sorted(states)} after {timeout}s "
        f"(last: {last.state.value if last else 'absent'}, {last.reason if last else ''})"
    )


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
