"""Faults an operator has to see and undo (issue 11, items 10 and 11): the broker unreachable
(the reason is on the study), dead letters (`medgemma-node outbox list/replay/drop` against a
PACS that was down) and a full log disk (the node keeps serving, `status` says so)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.nodeproc import ServerProcess, dicom_echo
from node.outbox import DeliveryState
from node.runtime import NodeRuntime
from node.status import collect_status
from node.synthetic import make_chest_radiograph, write_study
from tests.conftest import node_cli, storescu, wait_for_state
from tests.peers import OrthancFactory, free_port, wait_for

SMALL = {"rows": 256, "cols": 208}

# ------------------------------------------------------------------- broker unreachable


@pytest.fixture
def redis_on_port() -> Iterator[Callable[[int], None]]:
    """Start a throw-away redis-server on a given loopback port (stopped after the test)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                "no"]  # fmt: skip
        started.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        client = redis.Redis(port=port, socket_connect_timeout=1)
        wait_for(client.ping, 10, 0.05, f"redis-server on port {port}", ignore=(redis.RedisError,))

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def test_broker_unreachable_is_the_studys_reason_until_a_send_succeeds(
    node_factory: Callable[..., NodeRuntime],
    redis_on_port: Callable[[int], None],
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    port = free_port()
    node = node_factory(
        embedded=False, queue={"broker_url": f"redis://127.0.0.1:{port}/0", **queues}
    )
    image = make_chest_radiograph(seed=111, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = str(image.dataset.StudyInstanceUID)

    def reason() -> str:
        study = node.ledger.get_study(uid)
        return study.reason if study is not None and study.state.value == "queued" else ""

    text = wait_for(reason, 30, 0.1, "the broker failure on the study")
    assert text.startswith("queued; broker unreachable: OperationalError: "), text
    assert "Connection refused" in text and text.endswith(", retrying"), text
    assert "@" not in text and len(text) < 220  # no credentials, one short line
    # what the operator sees in `status`
    row = next(r for r in collect_status(node.settings).latest if r["study_uid"] == uid)
    assert row["state"] == "queued" and row["reason"] == text

    # the broker comes up on its address; the reconciler's re-send succeeds and clears it
    redis_on_port(port)
    assert [s.study_uid for s in node.coordinator.reconcile(older_than_seconds=0)] == [uid]
    study = node.ledger.get_study(uid)
    assert study is not None and study.state.value == "queued" and study.reason == ""
    assert redis.Redis(port=port).llen(queues["preread_queue"]) == 1


# ------------------------------------------------------------------- dead letters


def outbox_cli(node: NodeRuntime, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"MEDGEMMA_NODE_STORAGE__DATA_DIR": str(node.settings.storage.data_path)}
    return node_cli(env, "outbox", *args)


def listed(node: NodeRuntime, *args: str) -> list[dict[str, Any]]:
    result = outbox_cli(node, "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def test_dead_letters_are_listed_dropped_and_replayed_once_each(
    node_factory: Callable[..., NodeRuntime], orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    pacs_port = free_port()  # nothing listens there yet: the PACS is down
    node = node_factory(
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        outbox={"poll_seconds": 0.2, "max_attempts": 2, "backoff_base_seconds": 0.1},
    )
    image = make_chest_radiograph(seed=112, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = str(image.dataset.StudyInstanceUID)
    assert wait_for_state(node, uid, {"done", "failed"}, 60).state.value == "done"

    def all_dead() -> bool:
        rows = node.outbox.deliveries(study_uid=uid)
        return len(rows) == 2 and all(d.state is DeliveryState.DEAD for d in rows)

    wait_for(all_dead, 30, 0.1, "SR and SEG dead-lettered")

    # list: both, with what went wrong; filters by state and study
    dead = listed(node, "--state", "dead")
    assert sorted(d["kind"] for d in dead) == ["seg", "sr"]
    assert {d["study_uid"] for d in dead} == {uid}
    assert all(d["attempts"] == 2 and "unreachable" in d["last_error"] for d in dead)
    assert listed(node, "--study", "1.2.3.4") == [] and listed(node, "--state", "pending") == []
    text = outbox_cli(node, "list")
    assert text.returncode == 0 and text.stdout.count(" dead ") == 2 and uid in text.stdout
    sr = next(d for d in dead if d["kind"] == "sr")
    seg = next(d for d in dead if d["kind"] == "seg")

    # drop the SEG: kept as a file, never sent by replay --all-dead
    dropped = outbox_cli(node, "drop", str(seg["id"]), "--by", "ops@site")
    assert dropped.returncode == 0, dropped.stderr
    (row,) = listed(node, "--state", "dropped")
    assert row["id"] == seg["id"] and row["dropped_by"] == "ops@site" and row["dropped_at"]
    assert Path(seg["path"]).is_file()

    pacs = orthanc_factory(aet="PACS", extra_config={"DicomPort": pacs_port})
    replay = outbox_cli(node, "replay", "--all-dead")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith("1 replayed") and str(sr["id"]) in replay.stdout
    again = outbox_cli(node, "replay", "--all-dead")  # nothing dead any more: a no-op
    assert again.returncode == 0 and again.stdout.startswith("0 replayed")
    wait_for(lambda: pacs.find_instance(sr["sop_instance_uid"]), 30, 0.2, "the SR in the PACS")
    # the SEG comes back by its id
    assert outbox_cli(node, "replay", str(seg["id"])).returncode == 0
    wait_for(lambda: pacs.find_instance(seg["sop_instance_uid"]), 30, 0.2, "the SEG in the PACS")

    # the PACS holds each exactly once; each row was sent once after the replay
    uids = [pacs.instance_tags(i)["SOPInstanceUID"] for i in pacs.instances()]
    assert sorted(uids) == sorted([sr["sop_instance_uid"], seg["sop_instance_uid"]])
    rows = listed(node)
    assert {(d["state"], d["attempts"]) for d in rows} == {("delivered", 1)}
    # replaying a delivered row is refused with the reason, exit 1
    refused = outbox_cli(node, "replay", str(sr["id"]), "999999")
    assert refused.returncode == 1
    assert f"{sr['id']} left as it is: already delivered" in refused.stderr
    assert "999999 left as it is: no such delivery" in refused.stderr
    assert outbox_cli(node, "replay").returncode == 2  # neither ids nor --all-dead


def test_a_replayed_row_is_sent_once_by_racing_senders(
    node_factory: Callable[..., NodeRuntime], orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    """The node's sender and a second one (another node process) race for replayed rows."""
    from node.outbox import Outbox, OutboxSender

    pacs_port = free_port()
    node = node_factory(
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        outbox={"poll_seconds": 0.05, "max_attempts": 1},
    )
    image = make_chest_radiograph(seed=113, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = str(image.dataset.StudyInstanceUID)
    wait_for_state(node, uid, {"done"}, 60)
    wait_for(lambda: len(node.outbox.deliveries(state=DeliveryState.DEAD)) == 2, 30, 0.1, "dead")
    pacs = orthanc_factory(aet="PACS", extra_config={"DicomPort": pacs_port})
    other = OutboxSender(
        Outbox(node.ledger, node.settings.outbox), node.settings.destinations, "MEDGEMMA"
    )
    assert outbox_cli(node, "replay", "--all-dead").returncode == 0
    sent = 0
    while any(d.state is not DeliveryState.DELIVERED for d in node.outbox.deliveries()):
        sent += other.deliver_due()
    assert {d.attempts for d in node.outbox.deliveries()} == {1}
    assert len(pacs.instances()) == 2 and sent <= 2


# ------------------------------------------------------------------- full log disk


@pytest.fixture
def full_log_dir(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """<data_dir>/logs on a 64 KiB tmpfs filled to the last byte (a loopback mount needs root;
    without it, node.log is a link to /dev/full, which answers every write ENOSPC).
    Yields the data directory and a function that frees the space."""
    data_dir = tmp_path / "var"
    logs = data_dir / "logs"
    logs.mkdir(parents=True, mode=0o700)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(logs)],
            capture_output=True,
        ).returncode
        == 0
    )
    filler = logs / "filler"
    try:
        if mounted:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass  # ENOSPC: full
            finally:
                os.close(fd)
            yield data_dir, filler.unlink
        else:
            (logs / "node.log").symlink_to("/dev/full")
            yield data_dir, (logs / "node.log").unlink
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(logs)], check=False)


def test_full_log_disk_keeps_serving_and_status_says_so(
    full_log_dir: tuple[Path, Callable[[], None]],
    node_process: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    data_dir, free_space = full_log_dir
    port = free_port()
    env = {
        "MEDGEMMA_NODE_DICOM__PORT": str(port),
        "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
        "MEDGEMMA_NODE_API__HOST": "127.0.0.1",
        "MEDGEMMA_NODE_API__PORT": str(free_port()),
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(data_dir),
        "MEDGEMMA_NODE_STORAGE__MIN_FREE_MB": "0",
        "MEDGEMMA_NODE_COMPLETION__QUIET_SECONDS": "1",
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
    }
    serve = node_process(["serve"], env=env, ready=lambda p: dicom_echo(port), what="serve")

    def send_and_wait(seed: int) -> None:
        image = make_chest_radiograph(seed=seed, **SMALL)
        (path,) = write_study(tmp_path / f"in-{seed}", [image])
        assert storescu(port, path).returncode == 0
        uid = str(image.dataset.StudyInstanceUID)

        def done() -> bool:
            status = json.loads(node_cli(env, "status", "--json").stdout)
            return any(r["study_uid"] == uid and r["state"] == "done" for r in status["latest"])

        wait_for(done, 60, 0.5, f"study {uid} done: {serve.describe()}")

    send_and_wait(114)  # served although every log record failed to reach the file
    status = json.loads(node_cli(env, "status", "--json").stdout)
    problem = status["log_problem"]
    assert problem is not None, serve.describe()
    assert problem["message"].startswith("log file not writable since 20")
    assert problem["reason"] == "ENOSPC No space left on device"
    assert problem["path"] == str(data_dir / "logs" / "node.log")
    text = node_cli(env, "status").stdout
    assert f"Log:      {problem['message']}" in text
    # stderr: the records themselves, and the problem said once - no traceback per record
    output = serve.output()
    assert "Traceback" not in output and "--- Logging error ---" not in output, output
    assert output.count("log file not writable since") == 1, output
    assert "complete (1 instances): pre-read" in output  # logging to stderr went on

    free_space()  # space again: the next record reaches the file and status clears
    send_and_wait(115)
    wait_for(lambda: "writable again" in serve.output(), 10, 0.2, "the recovery line")
    assert json.loads(node_cli(env, "status", "--json").stdout)["log_problem"] is None
    assert "pre-read" in (data_dir / "logs" / "node.log").read_text()
