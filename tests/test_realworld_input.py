"""Real-world input (issue 11, items 1-4): files as public datasets, digitised films and
other vendors' modalities write them, sent by dcmtk storescu (or a pynetdicom SCU for
syntaxes dcmtk 3.6.7 does not know) to a running node; every assertion comes from the
ledger, the spool or the results the node wrote. The outcomes are listed in
docs/reliability.md ("Real-world input")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from node.ledger import SeriesSummary
from node.rules import ImageHeader, decide_preread, radiograph_refusal
from node.runtime import NodeRuntime
from node.scp import StoreStatus
from node.settings import PrereadSettings
from node.synthetic import make_chest_radiograph, make_non_chest_radiograph, write_study
from tests.conftest import storescu, wait_for_state
from tests.peers import dciodvfy_errors, wait_for
from workers.imaging import choose_views
from workers.prompts import parse_chest_check

SIZE = {"rows": 1000, "cols": 820}
DEFLATED_IMAGE_FRAME_COMPRESSION = UID("1.2.840.10008.1.2.8.1")
# Attributes of Type 2 that real files leave out (missing, not empty).
TYPE2_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# Every attribute that names the body part or the view.
BODY_PART_INFO = (
    "BodyPartExamined",
    "ViewPosition",
    "ViewCodeSequence",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "AnatomicRegionSequence",
)


def _send(node: NodeRuntime, *paths: Path) -> None:
    result = storescu(node.scp.port, *paths)
    assert result.returncode == 0, result.stderr
    assert "Failed" not in result.stderr and "Error" not in result.stderr, result.stderr


def _as_secondary_capture(ds: Dataset, photometric: str) -> Dataset:
    """A chest radiograph re-stored as a Secondary Capture (a digitised film / dataset export)."""
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.ConversionType = "DF"
    for keyword in ("ImagerPixelSpacing", "ViewCodeSequence", "DetectorType"):
        if keyword in ds:
            delattr(ds, keyword)
    if photometric == "RGB":
        arr = ds.pixel_array
        bits = int(ds.BitsStored)
        grey = (arr.astype(np.float64) * 255.0 / ((1 << bits) - 1)).round().astype(np.uint8)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            grey = 255 - grey
        ds.PixelData = np.repeat(grey[:, :, None], 3, axis=2).tobytes()
        ds["PixelData"].VR = "OB"
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = "RGB"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        for keyword in (
            "WindowCenter",
            "WindowWidth",
            "WindowCenterWidthExplanation",
            "VOILUTFunction",
            "RescaleIntercept",
            "RescaleSlope",
            "RescaleType",
        ):
            if keyword in ds:
                delattr(ds, keyword)
    return ds


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "RGB"])
def test_secondary_capture_chest_radiograph_is_read(
    node: NodeRuntime, tmp_path: Path, photometric: str
) -> None:
    image = make_chest_radiograph(seed=111, modality="DX", **SIZE)
    ds = _as_secondary_capture(image.dataset, photometric)
    path = tmp_path / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    _send(node, path)
    study = wait_for_state(node, str(ds.StudyInstanceUID), {"done", "failed", "skipped"}, 90)
    assert study.state.value == "done", study.reason
    assert study.result is not None
    assert study.result.frontal is not None
    assert study.result.frontal.sop_instance_uid == ds.SOPInstanceUID
    assert study.result.findings, "the phantom's nodule is found on the secondary capture"
    for output in (study.result.outputs.sr, study.result.outputs.seg):
        assert output is not None
        assert dciodvfy_errors(output.path) == [], output.path


def test_colour_secondary_capture_is_refused_with_the_reason(
    node: NodeRuntime, tmp_path: Path
) -> None:
    ds = _as_secondary_capture(make_chest_radiograph(seed=112, **SIZE).dataset, "RGB")
    rgb = ds.pixel_array.copy()
    rgb[100:400, 100:400, 0] = 255  # a red annotation: a photograph, not a grey radiograph
    ds.PixelData = rgb.tobytes()
    path = tmp_path / "colour.dcm"
    ds.save_as(path, enforce_file_format=True)
    _send(node, path)
    study = wait_for_state(node, str(ds.StudyInstanceUID), {"done", "failed", "skipped"}, 90)
    assert study.state.value == "failed"
    assert "colour" in study.reason, study.reason
    assert node.ledger.find_instance(ds.SOPInstanceUID) is not None  # kept all the same


def test_multiframe_secondary_capture_is_skipped_by_the_rules(
    node: NodeRuntime, tmp_path: Path
) -> None:
    ds = _as_secondary_capture(
        make_chest_radiograph(seed=113, rows=256, cols=208).dataset, "MONOCHROME2"
    )
    ds.NumberOfFrames = 2
    ds.PixelData = bytes(ds.PixelData) * 2
    path = tmp_path / "multiframe.dcm"
    ds.save_as(path, enforce_file_format=True)
    _send(node, path)
    study = wait_for_state(node, str(ds.StudyInstanceUID), {"done", "failed", "skipped"}, 60)
    assert study.state.value == "skipped"
    assert "2 frames" in study.reason, study.reason


def test_cr_without_patient_id_or_file_meta_gives_valid_sr_and_seg(
    node: NodeRuntime, tmp_path: Path
) -> None:
    ds = make_chest_radiograph(seed=114, **SIZE).dataset
    for keyword in TYPE2_PATIENT_STUDY:
        delattr(ds, keyword)
    del ds.file_meta
    path = tmp_path / "bare.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    raw = path.read_bytes()
    assert raw[128:132] != b"DICM" and b"1.2.840.10008.1.2" not in raw[:200]  # no meta
    _send(node, path)
    study = wait_for_state(node, str(ds.StudyInstanceUID), {"done", "failed", "skipped"}, 90)
    assert study.state.value == "done", study.reason
    assert study.result is not None and study.result.outputs.sr and study.result.outputs.seg
    for output in (study.result.outputs.sr, study.result.outputs.seg):
        written = pydicom.dcmread(output.path)
        for keyword in TYPE2_PATIENT_STUDY:
            assert keyword in written and written[keyword].value in ("", None), keyword
        assert dciodvfy_errors(output.path) == [], output.path


def _unlabelled(image_ds: Dataset, tmp_path: Path, name: str) -> Path:
    for keyword in BODY_PART_INFO:
        if keyword in image_ds:
            delattr(image_ds, keyword)
    path = tmp_path / f"{name}.dcm"
    image_ds.save_as(path, enforce_file_format=True)
    return path


def test_dx_without_body_part_information_is_skipped_naming_what_is_missing(
    node: NodeRuntime, tmp_path: Path
) -> None:
    ds = make_chest_radiograph(seed=115, modality="DX", rows=256, cols=208).dataset
    _send(node, _unlabelled(ds, tmp_path, "unlabelled"))
    study = wait_for_state(node, str(ds.StudyInstanceUID), {"done", "failed", "skipped"}, 60)
    assert study.state.value == "skipped"
    assert study.reason.startswith("not a chest study"), study.reason
    for keyword in (
        "BodyPartExamined",
        "ViewPosition",
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
    ):
        assert keyword in study.reason, study.reason


def test_engine_decides_unlabelled_dx_chest_read_limb_skipped(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = node_factory(preread={"ask_engine_if_unlabelled": True})
    chest = make_chest_radiograph(seed=116, modality="DX", **SIZE).dataset
    limb = make_non_chest_radiograph(seed=117, modality="DX").dataset
    _send(node, _unlabelled(chest, tmp_path, "chest"))
    _send(node, _unlabelled(limb, tmp_path, "limb"))
    read = wait_for_state(node, str(chest.StudyInstanceUID), {"done", "failed", "skipped"}, 90)
    assert read.state.value == "done", read.reason
    skipped = wait_for_state(node, str(limb.StudyInstanceUID), {"done", "failed", "skipped"}, 90)
    assert skipped.state.value == "skipped"
    assert skipped.reason == "the engine said it is not a frontal chest radiograph"
    assert skipped.result is None
    # the report registered when the study was queued ends cancelled, saying why
    from node.fhir import resources as fr
    from node.fhir.store import FhirStore

    def cancelled() -> dict[str, object] | None:
        stored = FhirStore(node.ledger).get(
            "DiagnosticReport", fr.report_id(str(limb.StudyInstanceUID))
        )
        return stored.resource if stored and stored.resource["status"] == "cancelled" else None

    report = wait_for(cancelled, 30, 0.2, "a cancelled DiagnosticReport")
    assert "not a frontal chest radiograph" in str(report)


def _header_only(transfer_syntax: str, tmp_path: Path, name: str) -> tuple[Dataset, Path]:
    """A complete file without Pixel Data (a header-only export) in an encapsulated syntax."""
    ds = make_chest_radiograph(seed=118, rows=256, cols=208).dataset
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return ds, path


def _c_store_raw(port: int, path: Path, transfer_syntax: str) -> int:
    """Send a file's bytes as they are, proposing its transfer syntax; the C-STORE status."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage, transfer_syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
        assert assoc.is_established
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        assert accepted == [transfer_syntax]
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        JPEG2000Lossless,
        DEFLATED_IMAGE_FRAME_COMPRESSION,
        HTJ2KLossless,
        UID("1.2.840.10008.1.2.4.202"),
        UID("1.2.840.10008.1.2.4.203"),
    ],
)
def test_header_only_files_in_current_syntaxes_are_stored(
    node: NodeRuntime, tmp_path: Path, transfer_syntax: UID
) -> None:
    ds, path = _header_only(transfer_syntax, tmp_path, "header")
    assert _c_store_raw(node.scp.port, path, transfer_syntax) == StoreStatus.SUCCESS
    inst = node.ledger.find_instance(ds.SOPInstanceUID)
    assert inst is not None and inst.transfer_syntax_uid == transfer_syntax
    stored = pydicom.dcmread(node.spool.path_of(inst.path))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and "PixelData" not in stored
    assert node.spool.path_of(inst.path).read_bytes()[-64:] == path.read_bytes()[-64:]


def test_truncated_encapsulated_pixel_data_is_still_refused(
    node: NodeRuntime, tmp_path: Path
) -> None:
    (path,) = write_study(
        tmp_path / "in",
        [make_chest_radiograph(seed=119, rows=256, cols=208, transfer_syntax=JPEG2000Lossless)],
    )
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 3000])
    assert _c_store_raw(node.scp.port, cut, JPEG2000Lossless) == StoreStatus.CANNOT_UNDERSTAND
    assert node.ledger.counts_by_state() == {}


def test_pixel_data_in_an_unknown_future_syntax_is_refused_at_association(
    node: NodeRuntime,
) -> None:
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.4.110")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
    assert assoc.is_established
    accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
    assoc.release()
    assert accepted == [ExplicitVRLittleEndian]  # JPEG XL: refused, as the README says


# ---------------------------------------------------------------- the rule itself


@pytest.mark.parametrize(
    ("header", "refusal"),
    [
        (ImageHeader(ComputedRadiographyImageStorage, "CR"), None),
        (ImageHeader(SecondaryCaptureImageStorage, "DX", photometric="MONOCHROME1"), None),
        (ImageHeader(SecondaryCaptureImageStorage, "CR", photometric="RGB"), None),
        (ImageHeader(SecondaryCaptureImageStorage, "OT", photometric="MONOCHROME2"), "OT"),
        (ImageHeader(SecondaryCaptureImageStorage, "CR", photometric="PALETTE COLOR"), "PALETTE"),
        (ImageHeader(SecondaryCaptureImageStorage, "DX", "", "MONOCHROME2", 3), "3 frames"),
        (ImageHeader(ComputedRadiographyImageStorage, "CR", has_pixels=False), "Rows"),
        (ImageHeader("1.2.840.10008.5.1.4.1.1.88.22", "SR"), "not a CR/DX image"),
    ],
)
def test_one_rule_for_a_readable_radiograph(header: ImageHeader, refusal: str | None) -> None:
    found = radiograph_refusal(header)
    assert (found is None) if refusal is None else (found is not None and refusal in found)


def test_rules_and_reader_agree_on_a_secondary_capture() -> None:
    ds = _as_secondary_capture(
        make_chest_radiograph(seed=120, rows=256, cols=208).dataset, "MONOCHROME2"
    )
    summary = SeriesSummary(str(ds.SeriesInstanceUID), "CR", "CHEST", "PA", "", "", 1)
    decision = decide_preread([summary], "", PrereadSettings(), [ImageHeader.of(ds)])
    assert decision.preread, decision.reason
    frontal, _ = choose_views([ds])
    assert frontal is not None and frontal.sop_instance_uid == ds.SOPInstanceUID
    ds.Modality = "OT"
    summary = SeriesSummary(str(ds.SeriesInstanceUID), "OT", "CHEST", "PA", "", "", 1)
    assert not decide_preread([summary], "", PrereadSettings(), [ImageHeader.of(ds)]).preread
    assert choose_views([ds]) == (None, None)


def test_unlabelled_study_asks_the_engine_only_when_configured() -> None:
    blank = SeriesSummary("1.2", "DX", "", "", "", "", 1)
    off = decide_preread([blank], "", PrereadSettings())
    assert not off.preread and not off.ask_engine
    on = decide_preread([blank], "", PrereadSettings(ask_engine_if_unlabelled=True))
    assert on.preread and on.ask_engine
    # information that says "not chest" is never handed to the engine
    hand = SeriesSummary("1.2", "DX", "", "", "HAND PA", "", 1)
    labelled = decide_preread([hand], "", PrereadSettings(ask_engine_if_unlabelled=True))
    assert not labelled.preread and "SeriesDescription" in labelled.reason


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Final Answer: yes", True),
        ("<unused94>no, wait<unused95>Final Answer: Yes.", True),
        ("It shows a knee.\n\nFinal Answer: no", False),
        ("I cannot tell.", None),
        ("yes or no", None),
    ],
)
def test_chest_check_answer(text: str, answer: bool | None) -> None:
    assert parse_chest_check(text) is answer
