"""The durable outbox against a real PACS (Orthanc): delivery, PACS down, dead letters, STOW-RS."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.ledger import StudyLedger
from node.outbox import DeliveryError, DeliveryState, Outbox, OutboxSender, send_dicom
from node.settings import Destination, OutboxSettings
from node.synthetic import make_secondary_capture, write_study
from tests.peers import OrthancFactory, OrthancPeer, free_port, wait_for


@pytest.fixture
def ledger(tmp_path: Path) -> StudyLedger:
    return StudyLedger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")


def result_file(tmp_path: Path, seed: int = 0) -> tuple[Path, str, str, str]:
    """A result-like DICOM file (a Secondary Capture of a study) and its UIDs."""
    study_uid = f"1.2.826.0.1.3680043.10.999.{seed + 1}"
    ds = make_secondary_capture(study_uid=study_uid, seed=seed)
    (path,) = write_study(tmp_path / f"result-{seed}", [ds])
    return path, study_uid, str(ds.SOPInstanceUID), str(ds.SOPClassUID)


def enqueue(outbox: Outbox, path: Path, study: str, sop: str, cls: str, dest: Destination) -> int:
    return outbox.enqueue(
        study_uid=study, study_version=1, kind="sr", sop_class_uid=cls,
        sop_instance_uid=sop, path=path, destinations=[dest],
    )  # fmt: skip


def test_result_is_delivered_to_the_pacs_in_its_study(
    ledger: StudyLedger, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    dest = Destination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    outbox = Outbox(ledger, OutboxSettings())
    path, study, sop, cls = result_file(tmp_path)
    assert enqueue(outbox, path, study, sop, cls, dest) == 1
    assert OutboxSender(outbox, [dest], "MEDGEMMA").deliver_due() == 1
    instance = orthanc.find_instance(sop)
    assert instance is not None
    tags = orthanc.instance_tags(instance)
    assert tags["StudyInstanceUID"] == study
    (delivery,) = outbox.deliveries()
    assert delivery.state is DeliveryState.DELIVERED and delivery.attempts == 1


def test_pacs_down_then_back_delivers_once_without_duplicates(
    ledger: StudyLedger, orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    port = free_port()
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=port)
    outbox = Outbox(ledger, OutboxSettings(backoff_base_seconds=0.2, backoff_max_seconds=0.5))
    sender = OutboxSender(outbox, [dest], "MEDGEMMA")
    path, study, sop, cls = result_file(tmp_path)
    enqueue(outbox, path, study, sop, cls, dest)

    assert sender.deliver_due() == 0  # nobody listens on the port
    (failed,) = outbox.deliveries()
    assert failed.state is DeliveryState.PENDING and failed.attempts == 1
    assert "unreachable" in failed.last_error
    assert sender.deliver_due() == 0  # backing off: not due yet, no attempt made
    assert outbox.deliveries()[0].attempts == 1

    pacs = orthanc_factory(aet="PACS", extra_config={"DicomPort": port})
    # due again once its backoff (0.2 s) has passed; calls before that attempt nothing
    wait_for(lambda: sender.deliver_due() == 1, 10, 0.05, "the retry after the backoff")
    # the worker enqueues the same result again (a redelivered task): nothing new is sent
    assert enqueue(outbox, path, study, sop, cls, dest) == 0
    assert sender.deliver_due() == 0
    assert [i for i in pacs.instances()] and len(pacs.instances()) == 1
    (done,) = outbox.deliveries()
    assert done.state is DeliveryState.DELIVERED and done.attempts == 2


def test_failures_end_in_the_dead_letter_state(ledger: StudyLedger, tmp_path: Path) -> None:
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    outbox = Outbox(ledger, OutboxSettings(max_attempts=2, backoff_base_seconds=0.05))
    sender = OutboxSender(outbox, [dest], "MEDGEMMA")
    path, study, sop, cls = result_file(tmp_path)
    enqueue(outbox, path, study, sop, cls, dest)
    sender.deliver_due()

    def retried() -> bool:
        sender.deliver_due()  # attempts nothing until the backoff (0.05 s) has passed
        return outbox.deliveries()[0].attempts == 2

    wait_for(retried, 10, 0.02, "the second attempt after the backoff")
    (dead,) = outbox.deliveries()
    assert dead.state is DeliveryState.DEAD and dead.attempts == 2
    assert outbox.counts() == {"pending": 0, "delivered": 0, "dead": 1, "dropped": 0}
    assert outbox.retry_dead() == 1
    assert outbox.deliveries()[0].state is DeliveryState.PENDING


def test_pacs_refusing_the_caller_is_a_failed_attempt(
    ledger: StudyLedger, orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    pacs = orthanc_factory(aet="PACS", extra_config={"DicomCheckCalledAet": True})
    dest = Destination(ae_title="NOTPACS", host="127.0.0.1", port=pacs.dicom_port)
    outbox = Outbox(ledger, OutboxSettings())
    path, study, sop, cls = result_file(tmp_path)
    enqueue(outbox, path, study, sop, cls, dest)
    assert OutboxSender(outbox, [dest], "MEDGEMMA").deliver_due() == 0
    assert "rejected the association" in outbox.deliveries()[0].last_error
    assert pacs.instances() == []


def test_stow_rs_to_a_dicomweb_destination(
    ledger: StudyLedger, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    dest = Destination(kind="dicomweb", url=f"{orthanc.http_url}/dicom-web")
    outbox = Outbox(ledger, OutboxSettings())
    path, study, sop, cls = result_file(tmp_path, seed=3)
    enqueue(outbox, path, study, sop, cls, dest)
    assert OutboxSender(outbox, [dest], "MEDGEMMA").deliver_due() == 1
    assert orthanc.find_instance(sop) is not None


def test_destination_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="needs host"):
        Destination(ae_title="PACS")
    with pytest.raises(ValueError, match="needs url"):
        Destination(kind="dicomweb", url="pacs:8042")
    assert Destination(ae_title="PACS", host="h", port=4242).key == "PACS@h:4242"


@pytest.mark.parametrize(
    ("status", "kept"),
    [(0x0000, True), (0xB000, True), (0x0001, True), (0xA700, False), (0xC000, False)],
)
def test_c_store_warnings_count_as_kept_and_failures_do_not(
    tmp_path: Path, status: int, kept: bool
) -> None:
    """A PACS that keeps the instance with a warning (coercion ...) has it; a failure has not."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    pacs = AE(ae_title="PACS")
    pacs.supported_contexts = AllStoragePresentationContexts
    server = pacs.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]
    )
    assert server is not None
    try:
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=server.server_address[1])
        path, *_ = result_file(tmp_path)
        if kept:
            send_dicom(dest, path, "MEDGEMMA", timeout=10)
        else:
            with pytest.raises(DeliveryError, match=f"status 0x{status:04X}"):
                send_dicom(dest, path, "MEDGEMMA", timeout=10)
    finally:
        pacs.shutdown()
