"""workers.imaging: view choice, decoding, grayscale pipeline, square transform, crops.

Every dataset here is built from numbers (no patient data, no downloads); the JPEG
Extended and Big Endian checks use files bundled inside the installed pydicom package
and are skipped if a build of pydicom leaves them out.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from workers.imaging import (
    MODEL_IMAGE_SIZE,
    DisplayImage,
    ImagingError,
    SquareTransform,
    choose_views,
    crop_source,
    load_display_image,
    to_model_image,
)

_PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
_PATIENT_NAME = "SYNTHETIC^IMAGING"


# --------------------------------------------------------------------------------------
# Dataset builders


def make_dataset(
    pixels: npt.NDArray[np.integer],
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    sop_class: str = ComputedRadiographyImageStorage,
    sop_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    **attrs: object,
) -> Dataset:
    """A minimal CR/DX-like dataset, Explicit VR Little Endian, around ``pixels``."""
    rows, cols = pixels.shape
    signed = pixels.dtype.kind == "i"
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{series_number}"
    ds.Modality = "CR"
    ds.PatientName = _PATIENT_NAME
    ds.PatientID = "SYN-IMG-1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[
        (ds.BitsAllocated, signed)
    ]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def roundtrip(ds: Dataset, tmp_path: Path) -> Path:
    """Write ``ds`` as a DICOM file and return its path."""
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def bright_square_pixels(
    rows: int, cols: int, box: tuple[int, int, int, int], photometric: str
) -> npt.NDArray[np.uint16]:
    """12-bit stored values: black background, a white square at ``box`` (pixel indices)."""
    r0, c0, r1, c1 = box
    display = np.zeros((rows, cols), dtype=np.uint16)
    display[r0:r1, c0:c1] = 4095
    return display if photometric == "MONOCHROME2" else (4095 - display).astype(np.uint16)


def smooth_pixels(rows: int, cols: int, seed: int = 0) -> npt.NDArray[np.uint16]:
    """12-bit values with structure and noise, so codecs have real work to do."""
    rng = np.random.default_rng(seed)
    r = np.linspace(0.0, 1.0, rows)[:, None]
    c = np.linspace(0.0, 1.0, cols)[None, :]
    base = 1800 + 1200 * np.sin(6 * r) * np.cos(5 * c) + rng.normal(0, 60, (rows, cols))
    return np.clip(base, 0, 4095).astype(np.uint16)


def jpeg_lossless(pixels: npt.NDArray[np.integer], precision: int) -> bytes:
    """A JPEG lossless (process 14, first-order prediction) codestream for a grayscale image.

    No library here writes lossless JPEG, so the test carries a small encoder: one
    Huffman table with every difference category (0..16) coded in 5 bits.
    """
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)
    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            bits.append(format((d if d > 0 else d - 1) & ((1 << ssss) - 1), f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    rows, cols = pixels.shape
    dht = b"\xff\xc4" + (36).to_bytes(2, "big") + b"\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11)
    dht += bytes(range(17))
    sof = b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision])
    sof += rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + b"\x01\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + dht + sof + sos + data + b"\xff\xd9"


def weighted_centroid(weights: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Brightness-weighted centre in continuous pixel coordinates (pixel centres at +0.5)."""
    ii, jj = np.indices(weights.shape)
    total = float(weights.sum())
    return float(((ii + 0.5) * weights).sum()) / total, float(((jj + 0.5) * weights).sum()) / total


def encapsulated(ds: Dataset, frame: bytes, syntax: str) -> Dataset:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


# --------------------------------------------------------------------------------------
# Square transform: exact both ways

SHAPES = [(2500, 2048), (2048, 2500), (301, 1000), (1000, 301), (512, 512)]


def grid(rows: int, cols: int, n: int = 9) -> Iterator[tuple[float, float]]:
    """Pixel edges, centres and corners over the image, including its border."""
    rs = [*np.linspace(0.0, rows, n).tolist(), 0.5, rows - 0.5, rows / 3.0]
    cs = [*np.linspace(0.0, cols, n).tolist(), 0.5, cols - 0.5, cols / 7.0]
    return itertools.product(rs, cs)


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_centred_padding_and_round_trip(rows: int, cols: int) -> None:
    tr = SquareTransform.centred(rows, cols)
    side = max(rows, cols)
    assert tr.side == side
    assert (tr.pad_top, tr.pad_left) == ((side - rows) // 2, (side - cols) // 2)
    # The image's edges land symmetrically in 0..1000 (centred padding).
    y0, x0 = tr.to_model(0, 0)
    y1, x1 = tr.to_model(rows, cols)
    assert y0 == pytest.approx(1000 - y1, abs=1000 / side)
    assert x0 == pytest.approx(1000 - x1, abs=1000 / side)
    for row, col in grid(rows, cols):
        y, x = tr.to_model(row, col)
        assert 0.0 <= y <= 1000.0 and 0.0 <= x <= 1000.0
        back = tr.to_source(y, x)
        assert back == pytest.approx((row, col), abs=1e-6)
    for y, x in itertools.product(np.linspace(0, 1000, 11).tolist(), repeat=2):
        assert tr.to_model(*tr.to_source(y, x)) == pytest.approx((y, x), abs=1e-9)


@pytest.mark.parametrize(("rows", "cols"), SHAPES[:4])
def test_boxes_round_trip(rows: int, cols: int) -> None:
    tr = SquareTransform.centred(rows, cols)
    unit = tr.side / 1000.0  # source pixels per model unit
    for r0, c0 in grid(rows - 50, cols - 50, 5):
        box = (r0, c0, r0 + 37.3, c0 + 50.0)
        model = tr.box_to_model(box)
        assert all(isinstance(v, int) and 0 <= v <= 1000 for v in model)
        back = tr.box_to_source(model)
        # The integer box contains the source box and is at most one model unit larger.
        assert back[0] <= box[0] + 1e-9 and back[1] <= box[1] + 1e-9
        assert back[2] >= box[2] - 1e-9 and back[3] >= box[3] - 1e-9
        for got, want in zip(back, box, strict=True):
            assert abs(got - want) <= unit + 1e-9
        # Integer model boxes survive the trip exactly.
        assert tr.box_to_model(back) == model


def test_box_to_source_clips_and_sorts() -> None:
    tr = SquareTransform.centred(2500, 2048)  # columns padded by 226 on the left
    assert tr.box_to_source([0, 0, 1000, 1000]) == (0.0, 0.0, 2500.0, 2048.0)
    r0, c0, r1, c1 = tr.box_to_source([600, 700, 400, 300])  # upside down
    assert r0 < r1 and c0 < c1
    assert (r0, c0) == pytest.approx(tr.to_source(400, 300))
    # A box wholly inside the left padding clips to zero width.
    _, c0, _, c1 = tr.box_to_source([100, 0, 200, 50])
    assert c0 == c1 == 0.0
    with pytest.raises(ValueError, match=r"box_2d"):
        tr.box_to_source([1, 2, 3])


def test_transform_validates() -> None:
    with pytest.raises(ValueError, match="side"):
        SquareTransform(10, 10, 0, 0, 0)
    with pytest.raises(TypeError, match="pad_top"):
        SquareTransform(10, 10, 10, 0.5, 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Model image: the pixels land where the transform says


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    ("rows", "cols", "box"),
    [
        (2500, 2048, (1000, 400, 1300, 700)),  # portrait: padded left and right
        (2048, 2500, (150, 1900, 420, 2310)),  # landscape: padded top and bottom
    ],
)
def test_bright_square_lands_in_predicted_box(
    rows: int, cols: int, box: tuple[int, int, int, int], photometric: str
) -> None:
    ds = make_dataset(
        bright_square_pixels(rows, cols, box, photometric),
        photometric=photometric,
        WindowCenter=2048,
        WindowWidth=4096,
    )
    img = load_display_image(ds)
    assert img.pixels[box[0], box[1]] == 1.0 and img.pixels[0, 0] == 0.0
    model, tr = to_model_image(img)
    assert model.shape == (MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3) and model.dtype == np.uint8
    assert (model[..., 0] == model[..., 1]).all() and (model[..., 0] == model[..., 2]).all()
    gray = model[..., 0].astype(int)

    y0, x0, y1, x1 = tr.box_to_model(box)
    k = MODEL_IMAGE_SIZE / 1000.0
    # Model pixels wholly inside the box (one-pixel guard for the bicubic kernel) are white.
    inner = gray[
        int(np.ceil(y0 * k)) + 1 : int(y1 * k) - 1, int(np.ceil(x0 * k)) + 1 : int(x1 * k) - 1
    ]
    assert inner.size > 0 and inner.min() >= 250
    # Outside the box grown by two model pixels everything is black.
    outside = np.ones_like(gray, dtype=bool)
    outside[
        max(0, int(y0 * k) - 2) : int(np.ceil(y1 * k)) + 2,
        max(0, int(x0 * k) - 2) : int(np.ceil(x1 * k)) + 2,
    ] = False
    assert gray[outside].max() <= 3
    # The bright mass sits where the exact (float) transform predicts it.
    centroid = weighted_centroid(gray.astype(float) / 255.0)
    expected = tr.to_model_pixel((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert centroid == pytest.approx(expected, abs=0.05)


def test_padding_is_black_and_image_fills_its_band() -> None:
    ds = make_dataset(
        np.full((200, 100), 4095, dtype=np.uint16), WindowCenter=2048, WindowWidth=4096
    )
    model, tr = to_model_image(load_display_image(ds), size=200)
    assert (tr.side, tr.pad_top, tr.pad_left) == (200, 0, 50)
    gray = model[..., 0]
    assert (gray[:, :50] == 0).all() and (gray[:, 150:] == 0).all()
    assert (gray[:, 50:150] == 255).all()


def test_resize_is_fast_for_a_full_size_radiograph() -> None:
    import time

    ds = make_dataset(smooth_pixels(2500, 2048), WindowCenter=2048, WindowWidth=4096)
    img = load_display_image(ds)
    started = time.perf_counter()
    to_model_image(img)
    assert time.perf_counter() - started < 0.5


# --------------------------------------------------------------------------------------
# Grayscale pipeline


def test_monochrome1_twin_gives_the_same_display_image() -> None:
    stored = smooth_pixels(120, 90, seed=3)
    m2 = load_display_image(make_dataset(stored))
    m1 = load_display_image(make_dataset(4095 - stored, photometric="MONOCHROME1"))
    assert m1.voi_source == m2.voi_source == "percentile"
    np.testing.assert_allclose(m1.pixels, m2.pixels, atol=1e-5)
    # With a window: the twin's window centre mirrors; LINEAR_EXACT is exactly symmetric.
    w2 = load_display_image(
        make_dataset(stored, WindowCenter=1900, WindowWidth=3000, VOILUTFunction="LINEAR_EXACT")
    )
    w1 = load_display_image(
        make_dataset(
            4095 - stored,
            photometric="MONOCHROME1",
            WindowCenter=4095 - 1900,
            WindowWidth=3000,
            VOILUTFunction="LINEAR_EXACT",
        )
    )
    np.testing.assert_allclose(w1.pixels, w2.pixels, atol=1e-5)


def test_monochrome1_twin_from_the_synthetic_phantom() -> None:
    synthetic = pytest.importorskip("node.synthetic")
    images = [
        synthetic.make_chest_radiograph(rows=160, cols=128, photometric=p, seed=5)
        for p in ("MONOCHROME2", "MONOCHROME1")
    ]
    m2, m1 = (load_display_image(im.dataset) for im in images)
    # Rounded window values and the LINEAR window's half-pixel offset leave < 1/1000.
    np.testing.assert_allclose(m1.pixels, m2.pixels, atol=2e-3)


def test_modality_lut_then_first_window() -> None:
    stored = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
    ds = make_dataset(
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=[1000, 50],
        WindowWidth=[2001, 10],
    )
    img = load_display_image(ds)
    assert img.voi_source == "window" and img.pixels.dtype == np.float32
    m = stored.astype(np.float64) * 2 - 1000
    expected = np.clip((m - (1000 - 0.5)) / (2001 - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-5)
    # MONOCHROME1: the same window, then inverted.
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(load_display_image(ds).pixels, 1.0 - expected, atol=1e-5)


def test_sigmoid_window() -> None:
    stored = np.array([[1000, 2000, 3000]], dtype=np.uint16)
    img = load_display_image(
        make_dataset(stored, WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID")
    )
    expected = 1.0 / (1.0 + np.exp(-4.0 * (stored.astype(float) - 2000) / 1000))
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


def test_modality_lut_sequence() -> None:
    stored = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [4 * v for v in range(256)]
    ds = make_dataset(
        stored,
        bits_stored=8 + 8,
        ModalityLUTSequence=DicomSequence([item]),
        WindowCenter=512,
        WindowWidth=1025,
        VOILUTFunction="LINEAR_EXACT",
    )
    expected = np.clip((4.0 * stored - 512) / 1025 + 0.5, 0, 1)
    np.testing.assert_allclose(load_display_image(ds).pixels, expected, atol=1e-5)


def test_voi_lut_sequence_is_applied_before_the_window() -> None:
    stored = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    lut = np.round(np.sqrt(np.arange(4096) / 4095.0) * 4095).astype(int)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # declared 16 bits, entries reach 4095 only
    item.LUTData = lut.tolist()
    ds = make_dataset(
        stored, VOILUTSequence=DicomSequence([item]), WindowCenter=100, WindowWidth=10
    )
    img = load_display_image(ds)
    assert img.voi_source == "VOILUTSequence"
    np.testing.assert_allclose(img.pixels, lut[stored] / 4095.0, atol=1e-6)
    # The first mapped value offsets the input; values below it take the first entry.
    item.LUTDescriptor = [4096, 1000, 12]
    shifted = load_display_image(ds).pixels
    np.testing.assert_allclose(
        shifted, lut[np.clip(stored.astype(int) - 1000, 0, 4095)] / 4095, atol=1e-6
    )


def test_percentile_window_without_voi() -> None:
    rng = np.random.default_rng(7)
    stored = rng.integers(500, 3500, size=(200, 150)).astype(np.uint16)
    img = load_display_image(make_dataset(stored))
    assert img.voi_source == "percentile"
    low, high = np.percentile(stored.astype(np.float32), [1.0, 99.0])
    np.testing.assert_allclose(img.pixels, np.clip((stored - low) / (high - low), 0, 1), atol=1e-5)
    assert (img.pixels == 0.0).mean() == pytest.approx(0.01, abs=0.003)
    assert (img.pixels == 1.0).mean() == pytest.approx(0.01, abs=0.003)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_pixel_padding_is_excluded_and_black(photometric: str) -> None:
    rng = np.random.default_rng(8)
    interior = rng.integers(1000, 3000, size=(100, 80)).astype(np.uint16)
    stored = np.full((140, 120), 4095, dtype=np.uint16)  # padding: white if displayed
    stored[20:120, 20:100] = interior
    alone = load_display_image(make_dataset(interior, photometric=photometric)).pixels
    img = load_display_image(make_dataset(stored, photometric=photometric, PixelPaddingValue=4095))
    border = np.ones(stored.shape, dtype=bool)
    border[20:120, 20:100] = False
    assert (img.pixels[border] == 0.0).all()
    np.testing.assert_allclose(img.pixels[20:120, 20:100], alone, atol=1e-5)
    # A padding range (Pixel Padding Range Limit) works the same way.
    stored[:5] = 4000
    ranged = load_display_image(
        make_dataset(
            stored, photometric=photometric, PixelPaddingValue=4095, PixelPaddingRangeLimit=3990
        )
    )
    assert (ranged.pixels[border] == 0.0).all()
    np.testing.assert_allclose(ranged.pixels[20:120, 20:100], alone, atol=1e-5)


def test_unused_high_bits_are_ignored() -> None:
    stored = smooth_pixels(40, 30, seed=4)
    clean = load_display_image(make_dataset(stored)).pixels
    noisy = load_display_image(make_dataset((stored | 0xF000).astype(np.uint16))).pixels
    np.testing.assert_array_equal(noisy, clean)


def test_signed_pixels_with_rescale_and_padding(tmp_path: Path) -> None:
    stored = (smooth_pixels(60, 50, seed=9).astype(np.int16) // 2 - 1000).astype(np.int16)
    stored[:4] = -2048  # the most negative 12-bit value
    ds = make_dataset(
        stored,
        RescaleSlope=1,
        RescaleIntercept=100,
        PixelPaddingValue=-2048,
        WindowCenter=100,
        WindowWidth=4096,
        VOILUTFunction="LINEAR_EXACT",
    )
    img = load_display_image(roundtrip(ds, tmp_path))
    assert (img.pixels[:4] == 0.0).all()
    expected = np.clip((stored[4:].astype(float) + 100 - 100) / 4096 + 0.5, 0, 1)
    np.testing.assert_allclose(img.pixels[4:], expected, atol=1e-5)


def test_pixel_spacing_preference() -> None:
    pixels = np.zeros((8, 8), dtype=np.uint16)
    both = load_display_image(
        make_dataset(pixels, ImagerPixelSpacing=[0.15, 0.15], PixelSpacing=[0.139, 0.138])
    )
    assert (both.pixel_spacing_mm, both.spacing_source) == ((0.139, 0.138), "PixelSpacing")
    imager = load_display_image(make_dataset(pixels, ImagerPixelSpacing=[0.2, 0.1]))
    assert (imager.pixel_spacing_mm, imager.spacing_source) == ((0.2, 0.1), "ImagerPixelSpacing")
    neither = load_display_image(make_dataset(pixels))
    assert (neither.pixel_spacing_mm, neither.spacing_source) == (None, "none")


# --------------------------------------------------------------------------------------
# Transfer syntaxes


@pytest.fixture(scope="module")
def reference() -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.float32]]:
    stored = smooth_pixels(96, 130, seed=11)
    return stored, load_display_image(make_dataset(stored)).as_float()


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    ],
    ids=lambda uid: UID(uid).keyword,
)
def test_lossless_syntaxes_decode_exactly(
    syntax: str,
    reference: tuple[npt.NDArray[np.uint16], npt.NDArray[np.float32]],
    tmp_path: Path,
) -> None:
    stored, expected = reference
    ds = make_dataset(stored)
    if UID(syntax).is_compressed:
        ds.compress(syntax, stored, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    path = roundtrip(ds, tmp_path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    img = load_display_image(path)
    assert img.transfer_syntax_uid == syntax
    np.testing.assert_array_equal(img.pixels, expected)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLossless], ids=["SV1", "process14"])
def test_jpeg_lossless_decodes_exactly(
    syntax: str,
    reference: tuple[npt.NDArray[np.uint16], npt.NDArray[np.float32]],
    tmp_path: Path,
) -> None:
    stored, expected = reference
    ds = encapsulated(make_dataset(stored), jpeg_lossless(stored, 12), syntax)
    np.testing.assert_array_equal(load_display_image(roundtrip(ds, tmp_path)).pixels, expected)


def test_jpeg_baseline_8bit(tmp_path: Path) -> None:
    stored = (smooth_pixels(96, 130, seed=12) >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored, mode="L").save(buffer, format="JPEG", quality=95)
    ds = encapsulated(
        make_dataset(
            stored, bits_stored=8, WindowCenter=128, WindowWidth=256, VOILUTFunction="LINEAR_EXACT"
        ),
        buffer.getvalue(),
        JPEGBaseline8Bit,
    )
    img = load_display_image(roundtrip(ds, tmp_path))
    assert np.abs(img.pixels - stored / 256.0).mean() < 0.01


@pytest.mark.parametrize(
    ("syntax", "options"),
    [(JPEGLSNearLossless, {"jls_error": 3}), (JPEG2000, {"j2k_cr": [10]})],
    ids=["jpegls-near", "j2k-lossy"],
)
def test_lossy_syntaxes_decode_close(
    syntax: str, options: dict[str, object], tmp_path: Path
) -> None:
    stored = smooth_pixels(96, 130, seed=13)
    ds = make_dataset(stored, WindowCenter=2048, WindowWidth=4096, VOILUTFunction="LINEAR_EXACT")
    ds.compress(syntax, stored, generate_instance_uid=False, **options)  # type: ignore[arg-type]
    img = load_display_image(roundtrip(ds, tmp_path))
    assert np.abs(img.pixels - stored / 4096.0).mean() < 0.01


def test_jpeg_extended_12bit_and_big_endian_files() -> None:
    extended = _PYDICOM_FILES / "JPGExtended.dcm"
    small, big = _PYDICOM_FILES / "MR_small.dcm", _PYDICOM_FILES / "MR_small_bigendian.dcm"
    if not (extended.exists() and small.exists() and big.exists()):
        pytest.skip("pydicom's bundled test files are not installed")
    img = load_display_image(extended)
    assert (img.rows, img.cols) == (1024, 256) and float(img.pixels.std()) > 0.05
    np.testing.assert_array_equal(load_display_image(big).pixels, load_display_image(small).pixels)


# --------------------------------------------------------------------------------------
# Decode failures


def test_corrupt_compressed_stream_raises_a_clear_error(tmp_path: Path) -> None:
    stored = smooth_pixels(64, 64)
    ds = make_dataset(stored)
    ds.compress(JPEG2000Lossless, stored, generate_instance_uid=False)
    frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    codestream = next(frame)
    damaged = codestream[:40] + bytes(200)
    ds = encapsulated(ds, damaged, JPEG2000Lossless)
    with pytest.raises(ImagingError) as caught:
        load_display_image(roundtrip(ds, tmp_path))
    message = str(caught.value)
    assert ds.SOPInstanceUID in message and "JPEG 2000" in message and "decode" in message
    assert "SYNTHETIC" not in message


def test_corrupt_rle_and_short_native_data_raise(tmp_path: Path) -> None:
    stored = smooth_pixels(64, 64)
    rle = make_dataset(stored)
    rle = encapsulated(rle, b"\x07\x00\x00\x00" + b"\xff" * 60, RLELossless)
    with pytest.raises(ImagingError, match=r"RLE Lossless"):
        load_display_image(rle)
    short = make_dataset(stored)
    short.PixelData = short.PixelData[:1000]
    with pytest.raises(ImagingError, match=short.SOPInstanceUID):
        load_display_image(short)
    not_dicom = tmp_path / "garbage.dcm"
    not_dicom.write_bytes(b"not a dicom file at all")
    with pytest.raises(ImagingError, match=r"garbage\.dcm"):
        load_display_image(not_dicom)


def test_missing_pixel_data_or_transfer_syntax_raises() -> None:
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(ImagingError, match="no Transfer Syntax UID"):
        load_display_image(ds)
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
    del ds.PixelData
    with pytest.raises(ImagingError, match="no Pixel Data"):
        load_display_image(ds)


# --------------------------------------------------------------------------------------
# View choice


def header(view: str | None = None, **kw: object) -> Dataset:
    attrs: dict[str, object] = dict(kw)
    if view is not None:
        attrs["ViewPosition"] = view
    return make_dataset(np.zeros((8, 8), dtype=np.uint16), **attrs)  # type: ignore[arg-type]


def test_pa_and_lateral_study(tmp_path: Path) -> None:
    pa = header("PA", series_number=1)
    ll = header("LL", series_number=2)
    paths = [roundtrip(ll, tmp_path), roundtrip(pa, tmp_path)]
    frontal, lateral = choose_views(paths)
    assert frontal is not None and lateral is not None
    assert (frontal.view, frontal.sop_instance_uid, frontal.reason) == (
        "frontal",
        pa.SOPInstanceUID,
        "ViewPosition PA",
    )
    assert (lateral.view, lateral.sop_instance_uid, lateral.reason) == (
        "lateral",
        ll.SOPInstanceUID,
        "ViewPosition LL",
    )
    assert frontal.path == paths[1] and frontal.source == paths[1]
    # Same answer from in-memory datasets, in any order.
    for order in ([pa, ll], [ll, pa]):
        f, lat = choose_views(order)
        assert f is not None and lat is not None
        assert (f.sop_instance_uid, lat.sop_instance_uid) == (pa.SOPInstanceUID, ll.SOPInstanceUID)
        assert f.source is pa


def test_synthetic_two_view_study(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("node.synthetic")
    for modality in ("CR", "DX"):
        pa, ll = synthetic.make_two_view_study(rows=96, cols=80, modality=modality)
        frontal, lateral = choose_views(synthetic.write_study(tmp_path / modality, [ll, pa]))
        assert frontal is not None and lateral is not None
        assert frontal.sop_instance_uid == pa.sop_instance_uid
        assert lateral.sop_instance_uid == ll.sop_instance_uid


def test_pa_preferred_over_ap_and_ap_only() -> None:
    ap = header("AP", instance_number=1)
    pa = header("PA", instance_number=2)
    frontal, lateral = choose_views([ap, pa])
    assert frontal is not None and frontal.sop_instance_uid == pa.SOPInstanceUID
    assert lateral is None
    frontal, lateral = choose_views([ap])
    assert frontal is not None and frontal.reason == "ViewPosition AP" and lateral is None


def test_unknown_view_takes_the_first_image() -> None:
    second = header(series_number=2, instance_number=1, sop_uid="1.2.3.9")
    first_b = header(series_number=1, instance_number=2, sop_uid="1.2.3.1")
    first_a = header(series_number=1, instance_number=2, sop_uid="1.2.3.0")
    frontal, lateral = choose_views([second, first_b, first_a])
    assert frontal is not None and lateral is None
    assert (frontal.sop_instance_uid, frontal.reason) == ("1.2.3.0", "view unknown")
    # A named frontal beats an unknown one; a lateral never comes from an unknown view.
    ll = header("LL", series_number=3)
    frontal, lateral = choose_views([second, ll])
    assert frontal is not None and frontal.sop_instance_uid == "1.2.3.9"
    assert lateral is not None and lateral.sop_instance_uid == ll.SOPInstanceUID


def test_view_code_sequence_only() -> None:
    dx = DigitalXRayImageStorageForPresentation
    pa = header(
        sop_class=dx,
        ViewCodeSequence=DicomSequence([code_item("272479007", "SCT", "postero-anterior")]),
    )
    ll = header(
        sop_class=dx,
        series_number=2,
        ViewCodeSequence=DicomSequence([code_item("R-10236", "SRT", "left lateral")]),
    )
    frontal, lateral = choose_views([ll, pa])
    assert frontal is not None and lateral is not None
    assert frontal.sop_instance_uid == pa.SOPInstanceUID
    assert frontal.reason == "ViewCodeSequence SCT 272479007 (postero-anterior)"
    assert lateral.sop_instance_uid == ll.SOPInstanceUID
    # A local code is recognised by its meaning; AP (SCT 399348003) ranks after PA.
    ap = header(
        sop_class=dx,
        ViewCodeSequence=DicomSequence([code_item("XR-AP", "99LOCAL", "Antero-Posterior")]),
    )
    frontal, _ = choose_views([ap])
    assert frontal is not None and "Antero-Posterior" in frontal.reason
    ap_sct = header(
        sop_class=dx,
        ViewCodeSequence=DicomSequence([code_item("399348003", "SCT", "antero-posterior")]),
    )
    frontal, _ = choose_views([ap_sct, pa])
    assert frontal is not None and frontal.sop_instance_uid == pa.SOPInstanceUID


def test_non_image_sop_classes_and_unreadable_files_are_ignored(tmp_path: Path) -> None:
    # a Secondary Capture that is not a radiograph (Modality OT); one with Modality CR/DX
    # is read (tests/test_realworld_input.py)
    sc = header("PA", sop_class=SecondaryCaptureImageStorage, Modality="OT")
    sr = Dataset()
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = generate_uid()
    sr.ViewPosition = "PA"
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    assert choose_views([sc, sr, junk]) == (None, None)
    cr = header("AP")
    frontal, _ = choose_views([sc, sr, junk, cr])
    assert frontal is not None and frontal.sop_instance_uid == cr.SOPInstanceUID


def test_for_presentation_preferred_over_for_processing() -> None:
    processing = header("PA", sop_class=DigitalXRayImageStorageForProcessing, instance_number=1)
    presentation = header("PA", sop_class=DigitalXRayImageStorageForPresentation, instance_number=2)
    frontal, _ = choose_views([processing, presentation])
    assert frontal is not None and frontal.sop_instance_uid == presentation.SOPInstanceUID


# --------------------------------------------------------------------------------------
# Crops for follow-up questions


def texture(rows: int, cols: int) -> DisplayImage:
    """A display image whose every pixel value encodes its position."""
    r, c = np.indices((rows, cols))
    pixels = (((r * 7 + c * 13) % 251) / 250.0).astype(np.float32)
    return DisplayImage(pixels, None, "none", "1.2.3", rows, cols)


def test_crop_is_full_resolution_and_maps_back_exactly() -> None:
    img = texture(2500, 2048)
    region = (1000.0, 800.0, 1040.0, 860.0)
    # out_size = crop side: no resampling, so the crop holds the source pixels themselves.
    _, tr = crop_source(img, region)
    crop, tr = crop_source(img, region, out_size=tr.side)
    assert tr.side == 224  # 60 px * 1.3 = 78 < the 224 px minimum context
    top, left = -tr.pad_top, -tr.pad_left
    source = img.pixels[top : top + 224, left : left + 224]
    np.testing.assert_array_equal(
        crop[..., 0], (source * np.float32(255) + np.float32(0.5)).astype(np.uint8)
    )
    # The region is centred in the crop, and the transform maps it both ways exactly.
    y0, x0, y1, x1 = tr.box_to_model(region)
    assert (y0 + y1) / 2 == pytest.approx(500, abs=3) and (x0 + x1) / 2 == pytest.approx(500, abs=3)
    back = tr.box_to_source(tr.box_to_model(region))
    assert back[0] <= region[0] and back[2] >= region[2]
    for row, col in grid(40, 60, 5):
        point = (region[0] + row, region[1] + col)
        assert tr.to_source(*tr.to_model(*point)) == pytest.approx(point, abs=1e-9)


def test_crop_resized_for_the_model_keeps_the_geometry() -> None:
    box = (1200, 300, 1260, 340)
    stored = bright_square_pixels(2500, 2048, box, "MONOCHROME2")
    img = load_display_image(make_dataset(stored, WindowCenter=2048, WindowWidth=4096))
    region = (1150.0, 250.0, 1350.0, 420.0)
    crop, tr = crop_source(img, region, margin_fraction=0.15)
    assert crop.shape == (896, 896, 3) and tr.side == 260 and tr.model_size == 896
    gray = crop[..., 0].astype(float) / 255.0
    centroid = weighted_centroid(gray)
    assert centroid == pytest.approx(tr.to_model_pixel(1230, 320), abs=0.1)
    y0, x0, y1, x1 = tr.box_to_model(box)
    k = 896 / 1000
    assert gray[int(y0 * k) + 3 : int(y1 * k) - 3, int(x0 * k) + 3 : int(x1 * k) - 3].min() > 0.98


def test_crop_at_the_image_edge_is_padded_black() -> None:
    img = texture(300, 200)
    crop, tr = crop_source(img, (0.0, 0.0, 10.0, 10.0), out_size=224)
    assert tr.side == 224 and tr.pad_top > 0 and tr.pad_left > 0
    gray = crop[..., 0]
    assert (gray[: tr.pad_top] == 0).all() and (gray[:, : tr.pad_left] == 0).all()
    r0, c0, r1, c1 = tr.box_to_source([0, 0, 1000, 1000])
    assert (r0, c0) == (0.0, 0.0) and r1 == 224 - tr.pad_top and c1 == 224 - tr.pad_left
    with pytest.raises(ValueError, match="outside"):
        crop_source(img, (400.0, 0.0, 500.0, 10.0))
