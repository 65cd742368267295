"""The short path from the last C-STORE to the results (issue 13 item 2).

A study whose association is released is completed without waiting for the quiet period,
pre-read, and its SR/SEG delivered without waiting for the outbox poll: every test here
sets ``quiet_seconds`` and ``outbox.poll_seconds`` to an hour where only the short path
can make it within the (generous) deadline. The quiet period still completes a study
whose association stays open, and callers listed in ``quiet_only_callers`` wait for it.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from bench.nodeproc import ServerProcess
from node import wakeup
from node.delivery import DeliveryState
from node.ledger import StudyState
from node.outbox import Outbox, OutboxSender
from node.runtime import NodeRuntime
from node.settings import Destination, OutboxSettings
from node.synthetic import (
    ChestImageOptions,
    make_chest_radiograph,
    make_two_view_study,
    write_study,
)
from tests.conftest import storescu, wait_for_state
from tests.peers import OrthancPeer, wait_for

SMALL: ChestImageOptions = {"rows": 256, "cols": 208}
HOUR = 3600.0


def pacs(orthanc: OrthancPeer) -> list[dict[str, object]]:
    return [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]


def results_in(orthanc: OrthancPeer, runtime: NodeRuntime, study_uid: str) -> bool:
    """Both the SR and the SEG of the study are in the PACS."""
    rows = runtime.outbox.deliveries(study_uid=study_uid)
    kinds = {d.kind for d in rows}
    return kinds == {"sr", "seg"} and all(
        orthanc.find_instance(d.sop_instance_uid) is not None for d in rows
    )


def test_released_study_is_read_and_delivered_without_quiet_period_or_poll(
    node_factory: Callable[..., NodeRuntime], orthanc: OrthancPeer, tmp_path: Path
) -> None:
    # on_association_release is not set: it is the default
    node = node_factory(
        completion={"quiet_seconds": HOUR, "poll_seconds": HOUR},
        outbox={"poll_seconds": HOUR},
        destinations=pacs(orthanc),
    )
    image = make_chest_radiograph(seed=131, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = str(image.dataset.StudyInstanceUID)
    study = wait_for_state(node, uid, {"done", "failed"}, 60)
    assert study.state is StudyState.DONE, study.reason
    wait_for(lambda: results_in(orthanc, node, uid), 60, 0.1, "SR and SEG in the PACS")
    # The PACS stores a file before the outbox records the answer: wait for the record too.
    wait_for(
        lambda: all(
            d.state is not DeliveryState.PENDING for d in node.outbox.deliveries(study_uid=uid)
        ),
        30,
        0.1,
        "both deliveries recorded",
    )
    assert {d.state for d in node.outbox.deliveries(study_uid=uid)} == {DeliveryState.DELIVERED}


def test_open_association_still_completes_by_the_quiet_period(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = node_factory(completion={"quiet_seconds": 1.0, "poll_seconds": 0.5})
    image = make_chest_radiograph(seed=132, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    ae = AE(ae_title="HOLDER")
    ds = dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0
        study = wait_for_state(node, str(ds.StudyInstanceUID), {"done", "failed"}, 60)
        assert study.state is StudyState.DONE, study.reason
        assert assoc.is_established  # completed while the sender still holds the association
    finally:
        assoc.release()


def test_back_to_back_associations_of_one_study_make_one_version(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    """A sender that sends each series over its own association, one right after the
    other, gets one study version (one pre-read of both images), not one per series: the
    grace time covers the gap (a new storescu process each), here with the sender's host
    not looked at before the grace time ends."""
    node = node_factory(
        completion={
            "quiet_seconds": HOUR,
            "release_grace_seconds": 2.0,
            "release_host_idle_seconds": 2.0,
        }
    )
    frontal, lateral = make_two_view_study(seed=133, **SMALL)
    first, second = write_study(tmp_path / "in", [frontal, lateral])
    assert storescu(node.scp.port, first).returncode == 0
    assert storescu(node.scp.port, second).returncode == 0
    uid = str(frontal.dataset.StudyInstanceUID)
    study = wait_for_state(node, uid, {"done", "failed"}, 60)
    assert study.state is StudyState.DONE, study.reason
    assert (study.version, study.instance_count) == (1, 2)
    assert [s.version for s in node.ledger.study_versions(uid)] == [1]


def test_a_released_study_completes_once_its_sender_has_no_connection_open(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    """The grace time (an hour here) is not waited when the sender's host has closed its
    connections: it is not sending a next association. The default host check (0.1 s
    after the release) completes the study."""
    node = node_factory(
        completion={"quiet_seconds": HOUR, "poll_seconds": HOUR, "release_grace_seconds": HOUR}
    )
    image = make_chest_radiograph(seed=136, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    study = wait_for_state(node, str(image.dataset.StudyInstanceUID), {"done", "failed"}, 60)
    assert study.state is StudyState.DONE, study.reason


def test_the_senders_next_association_keeps_the_study_open(
    node_factory: Callable[..., NodeRuntime],
) -> None:
    """A sender that opens its next association right after releasing one (a series per
    association) and sends the next series over it later than the host check: the study
    is not completed while that association is open, and is one version of both images."""
    node = node_factory(
        completion={
            "quiet_seconds": HOUR,
            "poll_seconds": HOUR,
            "release_grace_seconds": HOUR,
            "release_host_idle_seconds": 0.3,
        }
    )
    frontal, lateral = make_two_view_study(seed=137, **SMALL)
    uid = str(frontal.dataset.StudyInstanceUID)
    ae = AE(ae_title="SERIES")
    ae.add_requested_context(frontal.dataset.SOPClassUID, ExplicitVRLittleEndian)
    first = ae.associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
    assert first.is_established
    assert first.send_c_store(frontal.dataset).Status == 0
    first.release()
    second = ae.associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
    try:
        assert second.is_established
        time.sleep(1.5)  # five times the host check: the open association holds the study
        study = node.ledger.get_study(uid)
        assert study is not None and study.state is StudyState.RECEIVED
        assert second.send_c_store(lateral.dataset).Status == 0
    finally:
        second.release()
    study = wait_for_state(node, uid, {"done", "failed"}, 60)
    assert study.state is StudyState.DONE, study.reason
    assert (study.version, study.instance_count) == (1, 2)


def test_quiet_only_callers_wait_for_the_quiet_period(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = node_factory(
        completion={
            "quiet_seconds": HOUR,
            "poll_seconds": HOUR,
            "release_grace_seconds": 0,
            "quiet_only_callers": ["ROUTER"],
        }
    )
    listed, other = (make_chest_radiograph(seed=s, **SMALL) for s in (134, 135))
    (listed_path,) = write_study(tmp_path / "a", [listed])
    (other_path,) = write_study(tmp_path / "b", [other])
    assert storescu(node.scp.port, listed_path, calling="ROUTER").returncode == 0
    assert storescu(node.scp.port, other_path, calling="MODALITY").returncode == 0
    from_router = node.ledger.get_study(str(listed.dataset.StudyInstanceUID))
    from_modality = node.ledger.get_study(str(other.dataset.StudyInstanceUID))
    assert from_router is not None and from_modality is not None
    # what the SCP does when an association ends (it may still be doing it): both released
    node.coordinator.complete_on_release({from_router.id, from_modality.id})
    wait_for_state(node, from_modality.study_uid, {"done"}, 60)
    still = node.ledger.get_study(from_router.study_uid)
    assert still is not None and still.state is StudyState.RECEIVED


def test_a_worker_in_another_process_wakes_the_node_sender_through_redis(
    node_factory: Callable[..., NodeRuntime],
    node_process: Callable[..., ServerProcess],
    orthanc: OrthancPeer,
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    """scp + Celery worker: the worker writes the SR/SEG rows, the node's sender (polling
    once an hour) delivers them at once, woken through the broker."""
    env = {
        "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
        "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
        "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        "MEDGEMMA_NODE_DESTINATIONS": json.dumps(pacs(orthanc)),
    }
    node_process(
        ["worker", "--concurrency", "1", "--hostname", f"test-{secrets.token_hex(3)}@%h"],
        env=env,
        ready=lambda p: p.log_has(" ready."),
        what="Celery worker ready",
    )
    node = node_factory(
        embedded=False,
        queue={"broker_url": redis_url, **queues},
        completion={"quiet_seconds": HOUR, "poll_seconds": HOUR},
        outbox={"poll_seconds": HOUR},
        destinations=pacs(orthanc),
    )
    image = make_chest_radiograph(seed=136, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = str(image.dataset.StudyInstanceUID)
    study = wait_for_state(node, uid, {"done", "failed"}, 90)
    assert study.state is StudyState.DONE, study.reason
    wait_for(lambda: results_in(orthanc, node, uid), 60, 0.1, "SR and SEG in the PACS")


def test_sender_wakes_on_a_redis_message_and_on_a_local_ring(
    node_factory: Callable[..., NodeRuntime], redis_url: str, tmp_path: Path
) -> None:
    """The two wake-ups, each on its own: a PUBLISH from another process, and a ring in
    this one. The sender's poll is an hour, so only a wake-up makes it look."""
    node = node_factory(outbox={"poll_seconds": HOUR})
    woken = threading.Event()

    class Probe(OutboxSender):
        def deliver_due(self) -> int:
            woken.set()
            return 0

    dest = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    outbox = Outbox(node.ledger, OutboxSettings())
    probe = Probe(outbox, [dest], "MEDGEMMA", broker_url=redis_url)
    probe.start(HOUR)
    try:
        # once subscribed, the sender looks once (for anything published before)
        assert woken.wait(20), "the sender never subscribed to the wake-ups"
        woken.clear()
        redis.Redis.from_url(redis_url).publish(wakeup.CHANNEL, b"due")
        assert woken.wait(20), "a Redis message did not wake the sender"
        woken.clear()
        wakeup.ring()  # in-process, no broker
        assert woken.wait(20)
    finally:
        probe.stop()
