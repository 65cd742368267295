"""Smoke tests of the real peers the other tests rely on: Orthanc, dcmtk, PostgreSQL, Redis.

When one of these fails, the integration tests that use the peer cannot be trusted either;
the failure message says how to install or start it.
"""

from __future__ import annotations

import io
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.status import Status

from tests.peers import (
    OrthancPeer,
    dciodvfy_errors,
    dcmtk,
    dsrdump_ok,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.peers


def write_secondary_capture(path: Path) -> Dataset:
    """Write a tiny, valid 8x8 MONOCHROME2 Secondary Capture image to ``path``; return it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Peer^Smoke"
    ds.PatientID = "PEER-SMOKE"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.Laterality = ""
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint8).reshape(8, 8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture
def sc_file(tmp_path: Path) -> tuple[Path, Dataset]:
    path = tmp_path / "sc.dcm"
    return path, write_secondary_capture(path)


def test_sample_file_is_valid_dicom(sc_file: tuple[Path, Dataset]) -> None:
    path, _ = sc_file
    assert dciodvfy_errors(path) == []
    ok, output = dsrdump_ok(path)  # not an SR: dsrdump must say so
    assert not ok, output


def test_orthanc_accepts_upload_and_lists_it(
    orthanc: OrthancPeer, sc_file: tuple[Path, Dataset]
) -> None:
    path, ds = sc_file
    instance_id = orthanc.upload(path)

    assert orthanc.instances() == [instance_id]
    assert len(orthanc.studies()) == 1
    assert orthanc.instance_tags(instance_id)["SOPInstanceUID"] == ds.SOPInstanceUID
    # the DICOMweb plugin answers QIDO-RS
    studies = orthanc.rest("GET", "/dicom-web/studies")
    assert [s["0020000D"]["Value"][0] for s in studies] == [ds.StudyInstanceUID]


def test_dcmtk_echoscu_reaches_orthanc(orthanc: OrthancPeer) -> None:
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "MEDGEMMA", "-aec", orthanc.aet, orthanc.host,
         str(orthanc.dicom_port)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dcmtk_storescu_stores_into_orthanc(
    orthanc: OrthancPeer, sc_file: tuple[Path, Dataset]
) -> None:
    path, ds = sc_file
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "MEDGEMMA", "-aec", orthanc.aet, orthanc.host,
         str(orthanc.dicom_port), str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    instance_id = orthanc.wait_for_instance(ds.SOPInstanceUID)
    assert dcmread(io.BytesIO(orthanc.instance_file(instance_id))).PixelData == ds.PixelData


def test_orthanc_stores_to_a_modality_added_at_runtime(
    orthanc: OrthancPeer, sc_file: tuple[Path, Dataset]
) -> None:
    path, ds = sc_file
    received: list[str] = []
    done = threading.Event()

    def on_store(event: Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        done.set()
        return int(Status.SUCCESS)

    ae = AE(ae_title="MEDGEMMA")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None  # block=False returns the running server
    try:
        orthanc.add_modality("NODE", "MEDGEMMA", "127.0.0.1", port)
        assert orthanc.modalities()["NODE"]["Port"] == port
        instance_id = orthanc.upload(path)
        summary = orthanc.store_to_modality("NODE", instance_id)
        assert summary["FailedInstancesCount"] == 0, summary
        wait_for(done.is_set, timeout=10, what="the SCP to receive Orthanc's C-STORE")
        assert received == [ds.SOPInstanceUID]
    finally:
        server.shutdown()


def test_postgres_throwaway_database_accepts_connections(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE probe (id integer PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO probe VALUES (1)"))
            name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            count = conn.execute(sa.text("SELECT count(*) FROM probe")).scalar_one()
    finally:
        engine.dispose()
    assert name.startswith("medgemma_test_")
    assert count == 1


def test_redis_answers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        client.set("medgemma:peer-smoke", "ok", ex=30)
        assert client.get("medgemma:peer-smoke") == b"ok"
    finally:
        client.close()


def test_dcmtk_names_the_fix_when_a_tool_is_missing() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"dcmtk's no-such-tool is not installed"):
        dcmtk("no-such-tool")
