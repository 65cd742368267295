"""Tests for the synthetic chest radiograph generator (node.synthetic)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from node.synthetic import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION_STORAGE,
    DX_FOR_PROCESSING_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    SYNTAX_BY_NAME,
    Nodule,
    SyntheticImage,
    default_nodules,
    main,
    make_chest_radiograph,
    make_non_chest_radiograph,
    make_secondary_capture,
    make_two_view_study,
    write_study,
)

# Small images keep the suite fast; the anatomy scales with the size.
ROWS, COLS = 400, 328
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pydicom raise on any invalid value while writing and reading."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.RAISE)


def round_trip(ds: Dataset) -> Dataset:
    """Write ``ds`` as a DICOM file in memory and read it back."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    assert raw[128:132] == b"DICM"
    return pydicom.dcmread(io.BytesIO(raw))


def displayed(ds: Dataset) -> npt.NDArray[np.float64]:
    """The image as a viewer shows it: 0 = black .. 1 = white, MONOCHROME1 inverted."""
    max_value = (1 << int(ds.BitsStored)) - 1
    image = ds.pixel_array.astype(np.float64) / max_value
    return 1.0 - image if ds.PhotometricInterpretation == "MONOCHROME1" else image


def disk_and_ring_means(image: npt.NDArray[np.float64], nodule: Nodule) -> tuple[float, float]:
    """Mean inside 0.8 radius, and in the ring from 1.5 to 2.5 radii (pixels)."""
    rr, cc = np.ogrid[: image.shape[0], : image.shape[1]]
    d = np.hypot(rr - nodule.center_row, cc - nodule.center_col)
    r = nodule.radius_px
    return float(image[d <= 0.8 * r].mean()), float(image[(d >= 1.5 * r) & (d <= 2.5 * r)].mean())


def box_inside(
    inner: tuple[float, float, float, float], outer: tuple[float, float, float, float]
) -> bool:
    return (
        inner[0] >= outer[0]
        and inner[1] >= outer[1]
        and inner[2] <= outer[2]
        and inner[3] <= outer[3]
    )


def run_dciodvfy(path: Path) -> list[str]:
    """dciodvfy's output lines for ``path``; fails the test if it is not installed."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed: apt-get install dicom3tools")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).splitlines()


# ------------------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize("bits_stored", [8, 12, 16])
@pytest.mark.parametrize("syntax_name", list(SYNTAX_BY_NAME))
def test_every_syntax_round_trips_losslessly(syntax_name: str, bits_stored: int) -> None:
    syntax = SYNTAX_BY_NAME[syntax_name]
    reference = make_chest_radiograph(rows=ROWS, cols=COLS, bits_stored=bits_stored, seed=3)
    image = make_chest_radiograph(
        rows=ROWS, cols=COLS, bits_stored=bits_stored, seed=3, transfer_syntax=syntax
    )

    back = round_trip(image.dataset)

    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.SOPInstanceUID == reference.dataset.SOPInstanceUID  # same instance, re-encoded
    assert back.BitsAllocated == (8 if bits_stored == 8 else 16)
    assert back.BitsStored == bits_stored
    assert back.HighBit == bits_stored - 1 and back.PixelRepresentation == 0
    expected = reference.dataset.pixel_array
    decoded = back.pixel_array
    assert decoded.shape == (ROWS, COLS)
    np.testing.assert_array_equal(decoded, expected)
    assert int(decoded.max()) <= (1 << bits_stored) - 1
    assert back.LossyImageCompression == "00"


def test_compressed_syntaxes_are_encapsulated_and_smaller() -> None:
    native = make_chest_radiograph(rows=ROWS, cols=COLS, seed=1).dataset
    for syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds = make_chest_radiograph(rows=ROWS, cols=COLS, seed=1, transfer_syntax=syntax).dataset
        assert ds["PixelData"].is_undefined_length, syntax.name
        assert len(ds.PixelData) < len(native.PixelData), syntax.name


def test_deflated_file_is_actually_deflated(tmp_path: Path) -> None:
    image = make_chest_radiograph(
        rows=ROWS, cols=COLS, transfer_syntax=DeflatedExplicitVRLittleEndian
    )
    plain = make_chest_radiograph(rows=ROWS, cols=COLS)
    deflated_path, plain_path = (
        write_study(tmp_path / name, [im])[0] for name, im in (("d", image), ("p", plain))
    )
    assert deflated_path.stat().st_size < plain_path.stat().st_size
    back = pydicom.dcmread(deflated_path)
    assert back.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(back.pixel_array, plain.dataset.pixel_array)


def test_unsupported_transfer_syntax_is_refused() -> None:
    with pytest.raises(ValueError, match="transfer_syntax"):
        make_chest_radiograph(rows=ROWS, cols=COLS, transfer_syntax="1.2.840.10008.1.2.4.50")


# ------------------------------------------------------------------------------ the pixels


@pytest.mark.parametrize("modality", ["CR", "DX"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_nodules_are_brighter_than_their_surroundings(modality: str, photometric: str) -> None:
    image = make_chest_radiograph(rows=800, cols=656, modality=modality, photometric=photometric)
    shown = displayed(round_trip(image.dataset))
    assert len(image.nodules) == 2
    for nodule in image.nodules:
        disk, ring = disk_and_ring_means(shown, nodule)
        assert disk - ring > 0.08, (nodule, disk, ring)


def test_explicit_nodules_appear_where_given() -> None:
    nodule = Nodule(center_row=150.0, center_col=240.0, radius_px=9.0, label="mass", contrast=0.25)
    image = make_chest_radiograph(rows=ROWS, cols=COLS, nodules=[nodule])
    assert image.nodules == (nodule,)
    shown = displayed(image.dataset)
    disk, ring = disk_and_ring_means(shown, nodule)
    assert disk - ring > 0.1
    # where the default nodules would be, there is now only lung
    for absent in default_nodules(ROWS, COLS):
        disk, ring = disk_and_ring_means(shown, absent)
        assert abs(disk - ring) < 0.05


def test_no_nodules_gives_a_normal_chest() -> None:
    image = make_chest_radiograph(rows=ROWS, cols=COLS, nodules=())
    assert image.nodules == ()


def test_monochrome1_displays_the_same_image_as_monochrome2() -> None:
    mono2 = make_chest_radiograph(rows=ROWS, cols=COLS, photometric="MONOCHROME2").dataset
    mono1 = make_chest_radiograph(rows=ROWS, cols=COLS, photometric="MONOCHROME1").dataset
    assert not np.array_equal(mono1.pixel_array, mono2.pixel_array)
    np.testing.assert_allclose(displayed(mono1), displayed(mono2))
    # the window selects the same displayed range
    assert mono1.WindowWidth == mono2.WindowWidth
    assert mono1.WindowCenter == 4095 - mono2.WindowCenter


@pytest.mark.parametrize("view", ["PA", "LL"])
def test_default_nodules_lie_inside_the_lung_fields(view: str) -> None:
    image = make_chest_radiograph(rows=ROWS, cols=COLS, view_position=view)
    assert image.nodules == default_nodules(ROWS, COLS, view)
    assert len(image.lung_fields) == (2 if view == "PA" else 1)
    for nodule in image.nodules:
        assert any(box_inside(nodule.bbox(), lung) for lung in image.lung_fields), nodule


def test_default_nodules_are_seed_stable_and_scale_with_size() -> None:
    a = make_chest_radiograph(rows=ROWS, cols=COLS, seed=0).nodules
    b = make_chest_radiograph(rows=ROWS, cols=COLS, seed=7).nodules
    assert a == b
    full = default_nodules(2500, 2048)
    assert [(n.center_row, n.center_col, n.radius_px) for n in full] == [
        (850.0, 553.0, 36.9),
        (1400.0, 1577.0, 29.5),
    ]


def test_lungs_are_darker_than_mediastinum_and_soft_tissue() -> None:
    image = make_chest_radiograph(rows=ROWS, cols=COLS, nodules=())
    shown = displayed(image.dataset)
    (r0, c0, r1, c1), _ = image.lung_fields
    lung = shown[
        int(r0 + 0.3 * (r1 - r0)) : int(r0 + 0.5 * (r1 - r0)),
        int(c0 + 0.3 * (c1 - c0)) : int(c0 + 0.7 * (c1 - c0)),
    ].mean()
    mediastinum = shown[int(0.3 * ROWS) : int(0.5 * ROWS), int(0.48 * COLS) : int(0.52 * COLS)]
    air = shown[: int(0.05 * ROWS), : int(0.05 * COLS)]
    assert mediastinum.mean() - lung > 0.2
    assert lung - air.mean() > 0.1


def test_nodule_bbox_and_validation() -> None:
    nodule = Nodule(center_row=100.0, center_col=50.0, radius_px=10.0)
    assert nodule.bbox() == (90.0, 40.0, 110.0, 60.0)
    assert nodule.diameter_mm(0.15) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="radius_px"):
        Nodule(center_row=1.0, center_col=1.0, radius_px=0.0)
    with pytest.raises(ValueError, match="contrast"):
        Nodule(center_row=1.0, center_col=1.0, radius_px=5.0, contrast=1.5)
    with pytest.raises(TypeError, match="center_row"):
        Nodule(center_row="1", center_col=1.0, radius_px=5.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        make_chest_radiograph(
            rows=ROWS, cols=COLS, nodules=[Nodule(center_row=ROWS + 5, center_col=10, radius_px=4)]
        )
    with pytest.raises(TypeError, match="nodules"):
        make_chest_radiograph(rows=ROWS, cols=COLS, nodules=[(1, 2, 3)])  # type: ignore[list-item]


# ------------------------------------------------------------------------- the datasets


def test_datasets_survive_strict_writing_and_reading(strict: None) -> None:
    study = make_two_view_study(rows=ROWS, cols=COLS, modality="DX")
    images: list[SyntheticImage | Dataset] = [
        make_chest_radiograph(rows=ROWS, cols=COLS),
        make_chest_radiograph(rows=ROWS, cols=COLS, photometric="MONOCHROME1", bits_stored=16),
        make_chest_radiograph(rows=ROWS, cols=COLS, modality="DX", for_processing=True),
        *study,
        make_non_chest_radiograph(rows=ROWS, cols=COLS),
        make_secondary_capture(study_uid=study[0].dataset.StudyInstanceUID),
    ]
    for item in images:
        ds = item.dataset if isinstance(item, SyntheticImage) else item
        back = round_trip(ds)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert back.pixel_array.shape == (ds.Rows, ds.Columns)


def test_cr_attributes() -> None:
    ds = make_chest_radiograph(rows=ROWS, cols=COLS, pixel_spacing_mm=0.2).dataset
    assert ds.SOPClassUID == CR_IMAGE_STORAGE
    assert ds.Modality == "CR"
    assert ds.BodyPartExamined == "CHEST"
    assert ds.ViewPosition == "PA"
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.2, 0.2]
    assert "PixelSpacing" not in ds
    assert ds.PatientName == "SYNTHETIC^CHEST"
    assert ds.PatientID == "SYN0001"
    assert "SYNTHETIC" in ds.ImageComments
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert ds.WindowWidth > 0
    assert (
        "ImagerPixelSpacing"
        not in make_chest_radiograph(rows=ROWS, cols=COLS, pixel_spacing_mm=None).dataset
    )


def test_dx_attributes() -> None:
    ds = make_chest_radiograph(rows=ROWS, cols=COLS, modality="DX").dataset
    assert ds.SOPClassUID == DX_FOR_PRESENTATION_STORAGE
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.PixelIntensityRelationship == "LOG"
    assert ds.PixelIntensityRelationshipSign == -1
    assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (0, 1, "US")
    assert ds.PresentationLUTShape == "IDENTITY"
    assert ds.BurnedInAnnotation == "NO"
    assert ds.DetectorType
    assert ds.ViewCodeSequence[0].CodeMeaning == "postero-anterior"

    mono1 = make_chest_radiograph(
        rows=ROWS, cols=COLS, modality="DX", photometric="MONOCHROME1"
    ).dataset
    assert mono1.PixelIntensityRelationshipSign == 1
    assert mono1.PresentationLUTShape == "INVERSE"

    processing = make_chest_radiograph(
        rows=ROWS, cols=COLS, modality="DX", for_processing=True
    ).dataset
    assert processing.SOPClassUID == DX_FOR_PROCESSING_STORAGE
    assert processing.PresentationIntentType == "FOR PROCESSING"
    assert processing.SOPInstanceUID != ds.SOPInstanceUID

    with pytest.raises(ValueError, match="for_processing"):
        make_chest_radiograph(rows=ROWS, cols=COLS, modality="CR", for_processing=True)
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        make_chest_radiograph(rows=ROWS, cols=COLS, modality="DX", pixel_spacing_mm=None)
    with pytest.raises(ValueError, match="modality"):
        make_chest_radiograph(rows=ROWS, cols=COLS, modality="MG")


def test_generation_is_deterministic_and_uids_differ_by_seed_and_instance() -> None:
    a = make_chest_radiograph(rows=ROWS, cols=COLS, seed=5).dataset
    again = make_chest_radiograph(rows=ROWS, cols=COLS, seed=5).dataset
    other_seed = make_chest_radiograph(rows=ROWS, cols=COLS, seed=6).dataset
    second = make_chest_radiograph(rows=ROWS, cols=COLS, seed=5, instance_number=2).dataset

    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID) == (
        again.StudyInstanceUID,
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert a.PixelData == again.PixelData
    assert a.StudyInstanceUID != other_seed.StudyInstanceUID
    assert a.SOPInstanceUID != other_seed.SOPInstanceUID
    assert a.PixelData != other_seed.PixelData
    # a second instance of the same series
    assert second.StudyInstanceUID == a.StudyInstanceUID
    assert second.SeriesInstanceUID == a.SeriesInstanceUID
    assert second.SOPInstanceUID != a.SOPInstanceUID
    assert second.PixelData != a.PixelData
    for uid in (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID):
        assert uid.is_valid and len(uid) <= 64


def test_given_uids_are_used() -> None:
    ds = make_chest_radiograph(
        rows=ROWS, cols=COLS, study_uid="1.2.3", series_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5"
    ).dataset
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
    )
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"


def test_two_view_study_shares_the_study_in_two_series() -> None:
    pa, lateral = make_two_view_study(seed=4, rows=ROWS, cols=COLS, modality="DX")
    assert pa.dataset.StudyInstanceUID == lateral.dataset.StudyInstanceUID
    assert pa.dataset.SeriesInstanceUID != lateral.dataset.SeriesInstanceUID
    assert pa.dataset.SOPInstanceUID != lateral.dataset.SOPInstanceUID
    assert (pa.dataset.SeriesNumber, lateral.dataset.SeriesNumber) == (1, 2)
    assert (pa.dataset.ViewPosition, lateral.dataset.ViewPosition) == ("PA", "LL")
    assert list(lateral.dataset.PatientOrientation) == ["P", "F"]
    assert lateral.dataset.ViewCodeSequence[0].CodeMeaning == "left lateral"
    assert pa.dataset.AccessionNumber == lateral.dataset.AccessionNumber
    assert len(lateral.lung_fields) == 1
    # the same nodules, at the same heights
    assert [n.center_row for n in pa.nodules] == [n.center_row for n in lateral.nodules]
    shown = displayed(lateral.dataset)
    for nodule in lateral.nodules:
        disk, ring = disk_and_ring_means(shown, nodule)
        assert disk - ring > 0.08


def test_non_chest_radiograph_is_not_a_chest() -> None:
    image = make_non_chest_radiograph(rows=ROWS, cols=COLS)
    ds = image.dataset
    assert ds.SOPClassUID == CR_IMAGE_STORAGE
    assert ds.BodyPartExamined == "KNEE"
    for text in (ds.StudyDescription, ds.ProtocolName, ds.SeriesDescription):
        assert "CHEST" not in text.upper()
    assert ds.Laterality == "R"
    assert image.nodules == () and image.lung_fields == ()
    chest = make_chest_radiograph(rows=ROWS, cols=COLS)
    assert ds.StudyInstanceUID != chest.dataset.StudyInstanceUID
    pelvis = make_non_chest_radiograph(body_part="PELVIS", modality="DX", rows=ROWS, cols=COLS)
    assert pelvis.dataset.BodyPartExamined == "PELVIS"
    assert "Laterality" not in pelvis.dataset
    with pytest.raises(ValueError, match="body_part"):
        make_non_chest_radiograph(body_part="CHEST")


def test_secondary_capture_joins_the_study() -> None:
    chest = make_chest_radiograph(rows=ROWS, cols=COLS)
    sc = make_secondary_capture(study_uid=chest.dataset.StudyInstanceUID)
    assert sc.SOPClassUID == SECONDARY_CAPTURE_STORAGE
    assert sc.StudyInstanceUID == chest.dataset.StudyInstanceUID
    assert sc.SeriesInstanceUID != chest.dataset.SeriesInstanceUID
    assert (sc.PatientID, sc.AccessionNumber) == (
        chest.dataset.PatientID,
        chest.dataset.AccessionNumber,
    )
    assert sc.Modality == "OT" and sc.BitsAllocated == 8
    assert round_trip(sc).pixel_array.dtype == np.uint8


def test_write_study_writes_readable_files(tmp_path: Path) -> None:
    study = make_two_view_study(rows=ROWS, cols=COLS, transfer_syntax=JPEGLSLossless)
    sc = make_secondary_capture(study_uid=study[0].dataset.StudyInstanceUID)
    paths = write_study(tmp_path / "study", [*study, sc])
    assert len(paths) == 3 and len(set(paths)) == 3
    for path, ds in zip(paths, [study[0].dataset, study[1].dataset, sc], strict=True):
        assert path.read_bytes()[128:132] == b"DICM"
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


# ------------------------------------------------------------------------- full size + CLI


def test_full_size_radiograph(tmp_path: Path) -> None:
    make_chest_radiograph(seed=99)  # warm the phantom cache
    started = time.perf_counter()
    image = make_chest_radiograph(seed=1)
    elapsed = time.perf_counter() - started
    ds = image.dataset
    assert (ds.Rows, ds.Columns) == (2500, 2048)
    assert len(ds.PixelData) == 2500 * 2048 * 2
    assert elapsed < 2.0, f"full-size generation took {elapsed:.2f} s"
    path = write_study(tmp_path, [image])[0]
    assert 10_000_000 < path.stat().st_size < 11_000_000
    shown = displayed(pydicom.dcmread(path))
    for nodule in image.nodules:
        disk, ring = disk_and_ring_means(shown, nodule)
        assert disk - ring > 0.08

    jls = make_chest_radiograph(seed=1, transfer_syntax=JPEGLSLossless, photometric="MONOCHROME1")
    np.testing.assert_array_equal(round_trip(jls.dataset).pixel_array, 4095 - ds.pixel_array)


def test_cli_writes_n_distinct_instances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = main(
        [
            str(out),
            "--count",
            "5",
            "--rows",
            "256",
            "--cols",
            "208",
            "--per-study",
            "2",
            "--syntax",
            "rle",
            "--modality",
            "DX",
        ]
    )
    assert status == 0
    printed = capsys.readouterr()
    paths = [Path(line) for line in printed.out.splitlines()]
    assert len(paths) == 5 and sorted(paths) == sorted(out.iterdir())
    assert "wrote 5 files" in printed.err
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    assert len({ds.StudyInstanceUID for ds in datasets}) == 3
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {RLELossless}
    assert {ds.Modality for ds in datasets} == {"DX"}


def test_cli_two_view_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main([str(tmp_path), "--two-view", "--count", "3", "--rows", "200", "--cols", "164"]) == 0
    )
    datasets = [pydicom.dcmread(p) for p in tmp_path.iterdir()]
    assert sorted(ds.ViewPosition for ds in datasets) == ["LL", "PA", "PA"]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 2
    capsys.readouterr()
    assert main([str(tmp_path / "x"), "--rows", "10"]) == 2
    assert "rows" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.synthetic",
            str(tmp_path),
            "--count",
            "2",
            "--rows",
            "128",
            "--cols",
            "104",
            "--syntax",
            "implicit",
            "--seed",
            "11",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert len(list(tmp_path.glob("*.dcm"))) == 2


# ------------------------------------------------------------------------------ dciodvfy


def test_dciodvfy_finds_no_errors(tmp_path: Path) -> None:
    study = make_two_view_study(rows=256, cols=208, modality="DX", photometric="MONOCHROME1")
    images: list[SyntheticImage | Dataset] = [
        make_chest_radiograph(rows=256, cols=208),
        make_chest_radiograph(
            rows=256,
            cols=208,
            photometric="MONOCHROME1",
            bits_stored=16,
            transfer_syntax=JPEGLSLossless,
        ),
        make_chest_radiograph(rows=256, cols=208, modality="DX"),
        make_chest_radiograph(rows=256, cols=208, modality="DX", for_processing=True),
        *study,
        make_non_chest_radiograph(rows=256, cols=208),
        make_secondary_capture(study_uid=study[0].dataset.StudyInstanceUID),
    ]
    problems: list[str] = []
    for path in write_study(tmp_path, images):
        lines = run_dciodvfy(path)
        problems += [f"{path.name}: {line}" for line in lines if line.startswith("Error")]
    assert not problems, "\n".join(problems)


def test_explicit_little_endian_is_the_default() -> None:
    ds = make_chest_radiograph(rows=ROWS, cols=COLS).dataset
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
