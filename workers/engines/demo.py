"""The demo engine: deterministic, non-clinical image analysis that answers like MedGemma.

It is not a model. It finds the two lung fields (dark regions inside the body that do
not touch the image border), looks for bright, roughly round blobs inside them (peaks of
a difference of Gaussians; each measured along rays from its centre: contrast over the
local lung background, half-maximum extent, roundness, rim sharpness), and writes the
answer in exactly the format :func:`workers.prompts.build_preread_prompt` asks for:
reasoning, "Final Answer:", one fenced json block. Landmark boxes are estimated from the
lung fields' geometry. The follow-up prompts of :mod:`workers.dialogue.prompts` are
answered in their format too: describe measures the blob nearest the centre of the crop,
localise boxes landmarks, zones and lobes from the lung fields, relation is always
"uncertain". Every narrative and explanation says ``DEMO - not for clinical use``.

Pure numpy (scipy is not a dependency): Gaussian blurs are three box-filter passes,
connected components are labelled by runs with a union-find. About 0.1 s per
896 x 896 image on one CPU core.

Coordinates: image arrays are ``(row, col)`` pixels of the model-ready square image;
boxes in the answer are ``[y0, x0, y1, x1]`` in 0-1000 of that image. The image's left
is the patient's right (a PA or AP frontal view as displayed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sr_templates import ontology
from workers.dialogue.prompts import followup_task, localise_target, target_name
from workers.engines.base import EngineInfo, EngineRequest
from workers.prompts import LANDMARKS, is_chest_check_prompt, is_preread_prompt

DEMO_REVISION = "demo-2026.11.1"
DEMO_LABEL = "DEMO - not for clinical use"

FloatImage = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]
PixelBox = tuple[float, float, float, float]  # (row0, col0, row1, col1), model pixels

# Tuning, in pixels of the half-resolution analysis image unless stated otherwise. The
# thresholds were set on node.synthetic phantoms (nodules found, texture and ribs not);
# they mean nothing clinically.
_DOG_SIGMA_SMALL = 2.0
_DOG_SIGMA_LARGE = 8.0
_MIN_CONTRAST = 22.0  # grey levels (0-255) between blob peak and local lung background
_NOISE_FACTOR = 3.6  # ... and at least this many robust noise SDs of the lung detail
# Edge width: (radius at 25 % - radius at 75 % of the contrast) / radius at 50 %, median
# over rays. A well-defined round blob (flat top, sharp rim) is about 0.3; a Gaussian
# bump 0.77; a cone 1.0. Texture bumps of the phantom measure 0.45 and more, and 0.6 and
# more once brighter than 4.5 noise SDs; so the edge width allowed grows with the blob's
# contrast in noise SDs: 0.40 up to 4.5 SDs, then 0.1 per SD, up to 0.56.
_MAX_EDGE_WIDTH = 0.56
_FAINT_NOISE_FACTOR = 4.5
_FAINT_MAX_EDGE_WIDTH = 0.40
_EDGE_WIDTH_PER_SD = 0.1
_RAYS = 16
_MAX_ASPECT = 1.5  # longer / shorter side of a blob's half-maximum box
_RAY_RUNAWAY = 1.5  # a ray this many times the median half-maximum radius runs away ...
_MAX_RUNAWAY_RAYS = 4  # ... and more than this many such rays make an elongated shape
_MIN_LUNG_FRACTION = 0.01  # of the image area, per lung
_MAX_BLOBS = 8
_MAX_CANDIDATES = 200  # peaks measured per image, strongest first (bounds the run time)


@dataclass(frozen=True)
class _Lung:
    """One lung field in model pixels; ``side`` is the patient's side."""

    side: str  # right | left
    mask: Mask  # full-resolution mask, hole-filled
    box: PixelBox  # (row0, col0, row1, col1), end-exclusive


@dataclass(frozen=True)
class _Blob:
    box: PixelBox
    peak: tuple[int, int]
    contrast: float
    lung: _Lung


# ------------------------------------------------------------------ small image tools


def _box_1d(img: FloatImage, half: int, axis: int) -> FloatImage:
    """Mean over a window of ``2 * half + 1`` along ``axis``, clipped at the edges."""
    n = img.shape[axis]
    csum = np.cumsum(img, axis=axis, dtype=np.float64)
    zero_shape = list(img.shape)
    zero_shape[axis] = 1
    csum = np.concatenate([np.zeros(zero_shape), csum], axis=axis)
    idx = np.arange(n)
    hi = np.minimum(idx + half + 1, n)
    lo = np.maximum(idx - half, 0)
    total = np.take(csum, hi, axis=axis) - np.take(csum, lo, axis=axis)
    count = (hi - lo).astype(np.float64)
    shape = [1, 1]
    shape[axis] = n
    return np.asarray(total / count.reshape(shape), dtype=np.float32)


def _blur(img: FloatImage, sigma: float) -> FloatImage:
    """Approximate Gaussian blur: three passes of a box filter each way (O(N))."""
    # three boxes of width w have variance 3 * (w^2 - 1) / 12 = sigma^2
    half = max(1, round((np.sqrt(4.0 * sigma * sigma + 1.0) - 1.0) / 2.0))
    out = img
    for _ in range(3):
        out = _box_1d(_box_1d(out, half, 0), half, 1)
    return out


def _smooth3(img: FloatImage) -> FloatImage:
    """3 x 3 binomial smoothing ([1, 2, 1] / 4 each way), edges replicated."""
    p = np.pad(img, 1, mode="edge")
    rows = (p[:-2] + 2 * p[1:-1] + p[2:]) * np.float32(0.25)
    return np.asarray((rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) * 0.25, dtype=np.float32)


def _downsample(img: FloatImage, factor: int) -> FloatImage:
    """Mean of each ``factor x factor`` block (trailing rows/columns dropped)."""
    rows, cols = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    out = np.zeros((rows // factor, cols // factor), dtype=np.float32)
    for dr in range(factor):
        for dc in range(factor):
            out += img[dr:rows:factor, dc:cols:factor]
    out /= np.float32(factor * factor)
    return out


def _otsu(values: npt.NDArray[np.float32]) -> float:
    """Otsu threshold of grey values in 0-255."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.int64), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 128.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1)
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    return float(np.argmax(between)) + 0.5


def _label(mask: Mask) -> tuple[npt.NDArray[np.int32], int]:
    """8-connected component labels (1..n, 0 = background) by run-length union-find."""
    rows, cols = mask.shape
    labels = np.zeros((rows, cols), dtype=np.int32)
    padded = np.zeros((rows, cols + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(edges == 1)
    _, run_ends = np.nonzero(edges == -1)  # same row-major order as the starts
    n_runs = len(run_starts)
    if n_runs == 0:
        return labels, 0
    parent = list(range(n_runs))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_first = np.searchsorted(run_rows, np.arange(rows + 1))
    rs, re_ = run_starts.tolist(), run_ends.tolist()
    for r in range(1, rows):
        a, a_end = int(row_first[r - 1]), int(row_first[r])
        b, b_end = a_end, int(row_first[r + 1])
        while a < a_end and b < b_end:
            # 8-connectivity: runs touch when they overlap or meet at a corner
            if rs[a] <= re_[b] and rs[b] <= re_[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if re_[a] < re_[b]:
                a += 1
            else:
                b += 1
    roots = [find(i) for i in range(n_runs)]
    unique: dict[int, int] = {}
    run_label = np.array([unique.setdefault(root, len(unique) + 1) for root in roots])
    for i in range(n_runs):
        labels[run_rows[i], rs[i] : re_[i]] = run_label[i]
    return labels, len(unique)


def _fill_holes(mask: Mask) -> Mask:
    """Fill background regions that do not touch the border."""
    labels, n = _label(~mask)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    holes = ~np.isin(labels, border) & (labels > 0)
    return mask | holes


def _box_of(mask: Mask) -> PixelBox:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(rows[0]), float(cols[0]), float(rows[-1] + 1), float(cols[-1] + 1))


# ------------------------------------------------------------------ lung fields


def _lung_fields(gray: FloatImage) -> list[_Lung]:
    """The two lungs: large dark regions inside the body, not touching the border."""
    size = gray.shape
    factor = 4
    small = _blur(_downsample(gray, factor), 1.5)
    body_pixels = small[small >= 8.0]  # leave out padding and most direct exposure
    if body_pixels.size < 100:
        return []
    threshold = _otsu(body_pixels)
    dark = small < threshold
    labels, n = _label(dark)
    if n == 0:
        return []
    border = set(
        np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist()
    )
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    min_area = _MIN_LUNG_FRACTION * labels.size
    candidates = [i for i in range(1, n + 1) if i not in border and areas[i] >= min_area]
    candidates.sort(key=lambda i: (-int(areas[i]), i))
    chosen = candidates[:2]
    if not chosen:
        return []
    centre_col = small.shape[1] / 2.0
    lungs: list[_Lung] = []
    cols_small = np.arange(small.shape[1])
    for index in chosen:
        region = labels == index
        mean_col = float((region.sum(axis=0) * cols_small).sum() / region.sum())
        if len(chosen) == 2:
            other = chosen[1] if index == chosen[0] else chosen[0]
            other_region = labels == other
            other_col = float((other_region.sum(axis=0) * cols_small).sum() / other_region.sum())
            on_image_left = mean_col < other_col
        else:
            on_image_left = mean_col < centre_col
        filled = _fill_holes(region)
        full = np.repeat(np.repeat(filled, factor, axis=0), factor, axis=1)
        mask = np.zeros(size, dtype=bool)
        mask[: full.shape[0], : full.shape[1]] = full
        # image left = patient's right on a frontal view as displayed
        lungs.append(_Lung("right" if on_image_left else "left", mask, _box_of(mask)))
    lungs.sort(key=lambda lung: lung.box[1])
    return lungs


# ------------------------------------------------------------------ blobs


def _erode(mask: Mask, radius: int) -> Mask:
    """Binary erosion with a square of side ``2 * radius + 1`` (summed-area table)."""
    m = mask.astype(np.int32)
    sat = np.pad(m.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    rows, cols = mask.shape
    r0 = np.clip(np.arange(rows) - radius, 0, rows)
    r1 = np.clip(np.arange(rows) + radius + 1, 0, rows)
    c0 = np.clip(np.arange(cols) - radius, 0, cols)
    c1 = np.clip(np.arange(cols) + radius + 1, 0, cols)
    total = sat[r1][:, c1] - sat[r0][:, c1] - sat[r1][:, c0] + sat[r0][:, c0]
    area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    return np.asarray(total == area) & mask


def _local_maxima(img: FloatImage, radius: int) -> Mask:
    """Pixels equal to the maximum of their ``(2r+1)^2`` neighbourhood."""
    padded = np.pad(img, radius, mode="constant", constant_values=-np.inf)
    best = np.full(img.shape, -np.inf, dtype=np.float32)
    rows, cols = img.shape
    for dr in range(2 * radius + 1):
        for dc in range(2 * radius + 1):
            np.maximum(best, padded[dr : dr + rows, dc : dc + cols], out=best)
    return np.asarray(img >= best)


def _blobs(gray: FloatImage, lungs: list[_Lung]) -> list[_Blob]:
    """Bright round blobs inside the lungs, brightest first, boxes at half maximum."""
    if not lungs:
        return []
    factor = 2
    half = _downsample(gray, factor)
    dog = _blur(half, _DOG_SIGMA_SMALL) - _blur(half, _DOG_SIGMA_LARGE)
    lung_any = np.zeros(gray.shape, dtype=bool)
    for lung in lungs:
        lung_any |= lung.mask
    inner = _erode(lung_any[::factor, ::factor], 3)
    if not inner.any():
        return []
    # Robust noise of the fine detail inside the lungs (MAD of the DoG).
    inside = dog[inner]
    noise = 1.4826 * float(np.median(np.abs(inside - np.median(inside))))
    peaks = _local_maxima(dog, 3) & inner & (dog > max(_MIN_CONTRAST * 0.5, 2.0 * noise))
    rows, cols = np.nonzero(peaks)
    order = sorted(range(len(rows)), key=lambda i: (-float(dog[rows[i], cols[i]]), i))
    del order[_MAX_CANDIDATES:]
    fine = _smooth3(gray)
    accepted: list[_Blob] = []
    for i in order:
        if len(accepted) >= _MAX_BLOBS:
            break
        r = int(rows[i]) * factor + factor // 2
        c = int(cols[i]) * factor + factor // 2
        if any(b.box[0] <= r < b.box[2] and b.box[1] <= c < b.box[3] for b in accepted):
            continue
        home = next((lu for lu in lungs if lu.mask[r, c]), None)
        if home is None:
            continue
        blob = _measure_blob(fine, home, lung_any, (r, c), noise)
        if blob is not None:
            accepted.append(blob)
    accepted.sort(key=lambda b: (b.box[0], b.box[1]))
    return accepted


def _half_max_region(
    window: FloatImage, point: tuple[int, int], level: float
) -> npt.NDArray[np.bool_]:
    """The connected region at or above ``level`` that contains ``point``."""
    labels, _ = _label(window >= level)
    index = labels[point]
    if index == 0:
        return np.zeros(window.shape, dtype=bool)
    return np.asarray(labels == index)


def _measure_blob(
    fine: FloatImage, lung: _Lung, lung_any: Mask, seed: tuple[int, int], noise: float
) -> _Blob | None:
    """The blob's extent: the region around ``seed`` above half its contrast over the
    local lung background; None when it is faint, elongated (a rib), ragged, outside
    the lung, or a smooth texture bump rather than a well-defined blob."""
    rows, cols = fine.shape
    reach = 48  # model pixels: the largest blob measured is about 2 * reach wide
    r0, r1 = max(0, seed[0] - reach), min(rows, seed[0] + reach + 1)
    c0, c1 = max(0, seed[1] - reach), min(cols, seed[1] + reach + 1)
    window = fine[r0:r1, c0:c1]
    in_lung = lung_any[r0:r1, c0:c1]
    if in_lung.sum() < 50:
        return None
    background = float(np.median(window[in_lung]))
    min_contrast = max(_MIN_CONTRAST, _NOISE_FACTOR * noise)
    sr, sc = seed[0] - r0, seed[1] - c0
    nr0, nc0 = max(0, sr - 3), max(0, sc - 3)
    neighbourhood = window[nr0 : sr + 4, nc0 : sc + 4]
    flat = int(np.argmax(neighbourhood))
    first = (nr0 + flat // neighbourhood.shape[1], nc0 + flat % neighbourhood.shape[1])
    first_contrast = float(window[first]) - background
    if first_contrast < min_contrast:
        return None
    # The brightest pixel overstates a blob that carries texture; re-measure the contrast
    # as the median of its central part, around the centroid of the first region.
    region = _half_max_region(window, first, background + 0.5 * first_contrast)
    rr, cc = np.nonzero(region)
    centre = (round(float(rr.mean())), round(float(cc.mean())))
    radius = float(np.sqrt(rr.size / np.pi))
    near_centre = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= (0.5 * radius) ** 2
    if not near_centre.any():
        return None
    contrast = float(np.median(window[rr[near_centre], cc[near_centre]])) - background
    if contrast < min_contrast:
        return None
    # Extent along rays from the centre: the half-maximum radius per ray, with rays that
    # run on much further (a bridge of texture into a rib) cut to the blob's own size.
    r25, r50, r75 = _ray_radii(window, centre, background, contrast)
    typical = float(np.median(r50))
    if typical < 1.5:
        return None  # a speck, not a blob
    runaway = r50 > _RAY_RUNAWAY * typical
    if runaway.sum() > _MAX_RUNAWAY_RAYS:
        return None  # elongated: rib, clavicle, vessel or an edge
    reach_px = np.minimum(r50, _RAY_RUNAWAY * typical) - 0.25
    ys = centre[0] + 0.5 + _RAY_SIN * reach_px
    xs = centre[1] + 0.5 + _RAY_COS * reach_px
    top, left, bottom, right = float(ys.min()), float(xs.min()), float(ys.max()), float(xs.max())
    if top <= 0 or left <= 0 or bottom >= window.shape[0] or right >= window.shape[1]:
        return None  # reaches the window edge: a large structure, not a blob
    height, width = bottom - top, right - left
    if max(height, width) > _MAX_ASPECT * min(height, width):
        return None  # elongated: rib, clavicle or vessel
    region = _half_max_region(window, centre, background + 0.5 * contrast)
    inside = region[int(top) : int(np.ceil(bottom)), int(left) : int(np.ceil(right))]
    area = int(inside.sum())
    if area < 12 or area < 0.55 * height * width:
        return None  # too small, ragged or a crescent: an edge, not a round blob
    lung_part = in_lung[int(top) : int(np.ceil(bottom)), int(left) : int(np.ceil(right))]
    if lung_part[inside].mean() < 0.8:
        return None  # mostly outside the lung: heart or chest wall edge
    edge_width = float(np.median((r25 - r75) / np.maximum(r50, 1.0)))
    # Fainter blobs need sharper rims: texture bumps are faint and soft-edged.
    sds = contrast / max(noise, 1e-6)
    allowed = _FAINT_MAX_EDGE_WIDTH + _EDGE_WIDTH_PER_SD * (sds - _FAINT_NOISE_FACTOR)
    if edge_width > min(_MAX_EDGE_WIDTH, max(_FAINT_MAX_EDGE_WIDTH, allowed)):
        return None  # a smooth bump of lung texture, not a well-defined blob
    box = (r0 + top, c0 + left, r0 + bottom, c0 + right)
    return _Blob(box, (r0 + centre[0], c0 + centre[1]), contrast, lung)


_RAY_ANGLES = np.arange(_RAYS, dtype=np.float64) * (2 * np.pi / _RAYS)
_RAY_SIN = np.sin(_RAY_ANGLES)
_RAY_COS = np.cos(_RAY_ANGLES)


def _ray_radii(
    window: FloatImage, centre: tuple[int, int], background: float, contrast: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per ray from ``centre``: the distance (pixels) at which the profile first falls
    below 25 %, 50 % and 75 % of ``contrast`` above ``background``."""
    steps = np.arange(0.0, float(max(window.shape)), 0.5)
    rr = np.rint(centre[0] + _RAY_SIN[:, None] * steps[None, :]).astype(np.int64)
    cc = np.rint(centre[1] + _RAY_COS[:, None] * steps[None, :]).astype(np.int64)
    np.clip(rr, 0, window.shape[0] - 1, out=rr)
    np.clip(cc, 0, window.shape[1] - 1, out=cc)
    profile = (window[rr, cc] - np.float32(background)) / np.float32(contrast)

    def radius(level: float) -> npt.NDArray[np.float64]:
        below = profile < level
        index = np.where(below.any(axis=1), below.argmax(axis=1), len(steps) - 1)
        return np.asarray(steps[index], dtype=np.float64)

    return radius(0.25), radius(0.5), radius(0.75)


# ------------------------------------------------------------------ landmarks


def _medial_edge(lung: _Lung, row_from: float, row_to: float) -> float | None:
    """Median column of the lung's medial border between two rows (model pixels)."""
    r0, r1 = int(max(lung.box[0], row_from)), int(min(lung.box[2], row_to))
    rows = lung.mask[r0:r1]
    present = rows.any(axis=1)
    if not present.any():
        return None
    if lung.side == "right":  # image left: medial border is the rightmost lung pixel
        edge = rows.shape[1] - 1 - np.argmax(rows[:, ::-1], axis=1)
    else:
        edge = np.argmax(rows, axis=1)
    return float(np.median(edge[present]))


def _landmark_boxes(lungs: list[_Lung]) -> dict[str, PixelBox]:
    """Landmark boxes (model pixels) estimated from the lung fields' geometry."""
    boxes: dict[str, PixelBox] = {}
    hila: dict[str, tuple[float, float]] = {}
    for lung in lungs:
        y0, x0, y1, x1 = lung.box
        h, w = y1 - y0, x1 - x0
        medial_sign = 1.0 if lung.side == "right" else -1.0  # +: medial is image-right
        side = lung.side
        # hilum: medial border at about 45 % of the lung height
        hilum_row = y0 + 0.45 * h
        xm = _medial_edge(lung, hilum_row - 0.05 * h, hilum_row + 0.05 * h)
        if xm is not None:
            lateral_reach = 0.22 * w
            a, b = xm - medial_sign * lateral_reach, xm + medial_sign * 0.04 * w
            boxes[f"{side}_hilum"] = (
                hilum_row - 0.07 * h,
                min(a, b),
                hilum_row + 0.07 * h,
                max(a, b),
            )
            hila[side] = (hilum_row, xm)
        # apex: the top of the lung
        top_rows = lung.mask[int(y0) : int(y0 + max(2.0, 0.03 * h))]
        top_cols = np.flatnonzero(top_rows.any(axis=0))
        if top_cols.size:
            xa = float(top_cols.mean())
            boxes[f"{side}_lung_apex"] = (y0, xa - 0.15 * w, y0 + 0.10 * h, xa + 0.15 * w)
        # costophrenic angle: the lowest lateral point (lower outer corner)
        rr, cc = np.nonzero(lung.mask)
        lateral = (cc - x0) / w if side == "left" else (x1 - cc) / w
        score = (rr - y0) / h + 0.5 * lateral
        k = int(np.argmax(score))
        yc, xc = float(rr[k]), float(cc[k])
        a, b = xc + medial_sign * 0.20 * w, xc - medial_sign * 0.02 * w
        boxes[f"{side}_costophrenic_angle"] = (yc - 0.10 * h, min(a, b), yc + 0.02 * h, max(a, b))
        # heart border: the medial border of the lower lung
        xh = _medial_edge(lung, y0 + 0.60 * h, y0 + 0.90 * h)
        if xh is not None:
            band = (xh - 0.08 * w, xh + 0.08 * w)
            boxes[f"{side}_heart_border"] = (y0 + 0.58 * h, band[0], y0 + 0.92 * h, band[1])
    if "right" in hila and "left" in hila:
        (ry, rx), (ly, lx) = hila["right"], hila["left"]
        heights = [lung.box[2] - lung.box[0] for lung in lungs]
        h = float(np.mean(heights))
        yc, xc = min(ry, ly) - 0.12 * h, (rx + lx) / 2.0
        half_w = max(4.0, 0.12 * abs(lx - rx))
        boxes["carina"] = (yc - 0.04 * h, xc - half_w, yc + 0.04 * h, xc + half_w)
    return boxes


# ------------------------------------------------------------------ answer text


def _to_box_2d(box: PixelBox, shape: tuple[int, int]) -> list[int]:
    rows, cols = shape
    y0, x0, y1, x1 = box
    y0, y1 = max(0.0, y0), min(float(rows), y1)
    x0, x1 = max(0.0, x0), min(float(cols), x1)
    return [
        round(1000 * y0 / rows),
        round(1000 * x0 / cols),
        round(1000 * y1 / rows),
        round(1000 * x1 / cols),
    ]


def _zone(blob: _Blob) -> str:
    y0, _, y1, _ = blob.lung.box
    centre = (blob.box[0] + blob.box[2]) / 2.0
    third = (centre - y0) / max(1.0, y1 - y0)
    return "upper" if third < 1 / 3 else "middle" if third < 2 / 3 else "lower"


def _answer(
    blobs: list[_Blob], landmarks: dict[str, PixelBox], lungs: list[_Lung], shape: tuple[int, int]
) -> str:
    """The answer text: a line of reasoning, "Final Answer:", one fenced json block."""
    findings: list[dict[str, object]] = []
    labels: list[str] = []
    for blob in blobs:
        side, zone = blob.lung.side, _zone(blob)
        height, width = blob.box[2] - blob.box[0], blob.box[3] - blob.box[1]
        shape_term = "round" if max(height, width) <= 1.25 * min(height, width) else "oval"
        findings.append(
            {
                "box_2d": _to_box_2d(blob.box, shape),
                "label": f"{side} {zone} zone nodule",
                "finding": "nodule",
                "site": f"{side}_{zone}_zone",
                "laterality": side,
                "attributes": {"shape": shape_term},
            }
        )
        labels.append(f"{side} {zone} zone nodule")
    landmark_items = [
        {"box_2d": _to_box_2d(landmarks[name], shape), "label": name}
        for name in LANDMARKS
        if name in landmarks
    ]
    if not lungs:
        text = f"{DEMO_LABEL}. The demo engine could not identify the lung fields."
        impression = f"{DEMO_LABEL}. No analysis possible."
    elif findings:
        listed = "; ".join(labels)
        text = (
            f"{DEMO_LABEL}. A blob detector (not a model) found {len(findings)} bright "
            f"round opacity(ies) in the lung fields: {listed}."
        )
        impression = f"{DEMO_LABEL}. {len(findings)} nodule-like blob(s) flagged by the demo."
    else:
        text = f"{DEMO_LABEL}. A blob detector (not a model) found no bright round blobs."
        impression = f"{DEMO_LABEL}. No blobs flagged by the demo."
    answer = {
        "findings": findings,
        "landmarks": landmark_items,
        "findings_text": text,
        "impression": impression,
    }
    reasoning = (
        f"{DEMO_LABEL}: medgemma-node demo engine {DEMO_REVISION}, a deterministic blob "
        f"detector, not MedGemma. Lung fields found: {len(lungs)}; blobs: {len(findings)}."
    )
    return f"{reasoning}\n\nFinal Answer:\n```json\n{_format_answer(answer)}\n```"


def _format_answer(answer: Mapping[str, object]) -> str:
    """JSON with one finding or landmark per line, as MedGemma tends to write it."""
    lines: list[str] = []
    for key, value in answer.items():
        if isinstance(value, list) and value:
            items = ",\n  ".join(json.dumps(item, ensure_ascii=False) for item in value)
            lines.append(f'"{key}": [\n  {items}\n ]')
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{" + ",\n ".join(lines) + "}"


def _unsupported_answer() -> str:
    answer = {
        "findings": [],
        "landmarks": [],
        "findings_text": (
            f"{DEMO_LABEL}. The demo engine only supports the structured pre-read and "
            "follow-up prompts; it cannot answer this request."
        ),
        "impression": f"{DEMO_LABEL}. Not answered by the demo engine.",
    }
    body = _format_answer(answer)
    return f"{DEMO_LABEL}: unsupported prompt.\n\nFinal Answer:\n```json\n{body}\n```"


def _gray(image: npt.NDArray[np.generic]) -> FloatImage:
    """Grey values 0-255 from an (S, S, 3) uint8 RGB or (S, S) image."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = (
            arr[..., 0].astype(np.float32) + arr[..., 1].astype(np.float32) + arr[..., 2]
        ) / np.float32(3.0)
    elif arr.ndim == 3:
        arr = arr[..., 0]
    elif arr.ndim != 2:
        raise ValueError(f"image must have shape (S, S, 3) or (S, S), got {arr.shape}")
    if arr.shape[0] < 32 or arr.shape[1] < 32:
        raise ValueError(f"image must be at least 32 x 32 pixels, got {arr.shape}")
    return np.asarray(arr, dtype=np.float32)


def analyse_preread(image: npt.NDArray[np.generic]) -> str:
    """The demo pre-read answer for one model-ready frontal image (uint8 RGB, square)."""
    gray = _gray(image)
    lungs = _lung_fields(gray)
    blobs = _blobs(gray, lungs)
    landmarks = _landmark_boxes(lungs) if len(lungs) == 2 else {}
    return _answer(blobs, landmarks, lungs, (gray.shape[0], gray.shape[1]))


def analyse_chest_check(image: npt.NDArray[np.generic]) -> str:
    """The demo answer to the chest check (:func:`workers.prompts.build_chest_check_prompt`):
    yes when it finds two lung fields in the model-ready image, else no."""
    lungs = _lung_fields(_gray(image))
    verdict = "yes" if len(lungs) == 2 else "no"
    return (
        f"{DEMO_LABEL}: medgemma-node demo engine {DEMO_REVISION}, not MedGemma. "
        f"Lung fields found: {len(lungs)}.\n\nFinal Answer: {verdict}"
    )


# ------------------------------------------------------------------ follow-up turns

# Describe: the crop (second image) is analysed at half resolution. The thresholds were
# set on node.synthetic phantoms cropped with workers.imaging.crop_source: a default
# nodule (contrast 0.2) measures an edge width of 0.11-0.28 and a contrast of 55-80 grey
# levels, one of contrast 0.05 about 18; lung texture bumps an edge width of 0.6 and more.
# They mean nothing clinically.
_CROP_FACTOR = 2
_CROP_SEED_SIGMA = 4.0  # analysis pixels: the blur whose local maxima seed the blobs
_CROP_CENTRE_REACH = 0.25  # a seed lies within this fraction of the side from the centre
_CROP_MAX_SEEDS = 12  # seeds measured, nearest the centre first
_CROP_RING = 0.1  # the outer band (fraction of the side) that gives the background
_CROP_BACKGROUND_PERCENTILE = 25.0  # of the border band: a first lung background
_CROP_MIN_CONTRAST = 15.0  # grey levels over the background, and ...
_CROP_NOISE_FACTOR = 4.0  # ... this many robust noise SDs of the band
_SMOOTH_MAX_EDGE_WIDTH = 0.35  # edge width (see _MAX_EDGE_WIDTH) up to this: smooth margin
_ROUND_MAX_ASPECT = 1.2  # longer / shorter side of the half-maximum box: round, else oval
_SOLID_MIN_CONTRAST = 25.0  # grey levels over the background: solid, else ground-glass
_LOBE_ZONES: Mapping[str, tuple[str, ...]] = {
    # a lobe drawn as the zones it usually projects to on a frontal view
    "right_upper_lobe": ("upper",),
    "right_middle_lobe": ("middle",),
    "right_lower_lobe": ("lower",),
    "left_upper_lobe": ("upper", "middle"),  # with the lingula
    "lingula": ("middle",),
    "left_lower_lobe": ("lower",),
}
_ZONES = ("upper", "middle", "lower")


@dataclass(frozen=True)
class _CropBlob:
    """A blob measured on the crop, in analysis pixels."""

    box: PixelBox
    contrast: float
    edge_width: float


def _crop_blob(gray: FloatImage) -> _CropBlob | None:
    """The bright blob nearest the centre of a crop, or None when there is none there."""
    small = _downsample(gray, _CROP_FACTOR)
    rows, cols = small.shape
    valid = small >= 8.0  # leave out the black overhang of a crop at the image edge
    ring = np.ones(small.shape, dtype=bool)
    band = max(2, round(_CROP_RING * min(rows, cols)))
    ring[band:-band, band:-band] = False
    ring &= valid
    if ring.sum() < 50 or valid.mean() < 0.25:
        return None
    # A first background: the darker part of the border band (lung, where the band also
    # crosses the heart or the chest wall); refined around each blob below.
    background = float(np.percentile(small[ring], _CROP_BACKGROUND_PERCENTILE))
    detail = (small - _blur(small, 2.0))[ring]
    noise = 1.4826 * float(np.median(np.abs(detail - np.median(detail))))
    min_contrast = max(_CROP_MIN_CONTRAST, _CROP_NOISE_FACTOR * noise)
    seeds = _local_maxima(_blur(small, _CROP_SEED_SIGMA), 3) & valid
    seed_rows, seed_cols = np.nonzero(seeds)
    distance = np.hypot(seed_rows + 0.5 - rows / 2.0, seed_cols + 0.5 - cols / 2.0)
    near = distance <= _CROP_CENTRE_REACH * min(rows, cols)
    order = sorted(np.flatnonzero(near).tolist(), key=lambda i: (float(distance[i]), i))
    fine = _smooth3(small)
    for i in order[:_CROP_MAX_SEEDS]:
        seed = (int(seed_rows[i]), int(seed_cols[i]))
        blob = _measure_crop_blob(fine, seed, background)
        if blob is None:
            continue
        # Refine: the background is the median of an annulus just outside the blob.
        local = _annulus_background(fine, valid, blob)
        if local is not None:
            blob = _measure_crop_blob(fine, seed, local)
        if blob is not None and blob.contrast >= min_contrast:
            return blob
    return None


def _annulus_background(fine: FloatImage, valid: Mask, blob: _CropBlob) -> float | None:
    """Median grey value between 1.5 and 2.5 blob radii from the blob's centre."""
    y0, x0, y1, x1 = blob.box
    cy, cx, radius = (y0 + y1) / 2.0, (x0 + x1) / 2.0, max(y1 - y0, x1 - x0) / 2.0
    rr = np.arange(fine.shape[0])[:, None] + 0.5 - cy
    cc = np.arange(fine.shape[1])[None, :] + 0.5 - cx
    distance = np.hypot(rr, cc)
    annulus = valid & (distance >= 1.5 * radius) & (distance <= 2.5 * radius)
    if annulus.sum() < 20:
        return None
    return float(np.median(fine[annulus]))


def _measure_crop_blob(
    fine: FloatImage, seed: tuple[int, int], background: float
) -> _CropBlob | None:
    """The half-maximum extent and rim sharpness of the blob at ``seed``; None when it is
    a speck, elongated (rib, vessel, edge) or runs into the crop's border."""
    first_contrast = float(fine[seed]) - background
    if first_contrast <= 0:
        return None
    region = _half_max_region(fine, seed, background + 0.5 * first_contrast)
    rr, cc = np.nonzero(region)
    if rr.size == 0:
        return None
    centre = (round(float(rr.mean())), round(float(cc.mean())))
    radius = float(np.sqrt(rr.size / np.pi))
    near_centre = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= (0.5 * radius) ** 2
    if not near_centre.any():
        return None
    contrast = float(np.median(fine[rr[near_centre], cc[near_centre]])) - background
    if contrast <= 0:
        return None
    r25, r50, r75 = _ray_radii(fine, centre, background, contrast)
    typical = float(np.median(r50))
    if typical < 1.5:
        return None  # a speck, not a blob
    if (r50 > _RAY_RUNAWAY * typical).sum() > _MAX_RUNAWAY_RAYS:
        return None  # elongated: rib, clavicle, vessel or an edge
    reach = np.minimum(r50, _RAY_RUNAWAY * typical) - 0.25
    ys = centre[0] + 0.5 + _RAY_SIN * reach
    xs = centre[1] + 0.5 + _RAY_COS * reach
    top, left, bottom, right = float(ys.min()), float(xs.min()), float(ys.max()), float(xs.max())
    if top <= 0 or left <= 0 or bottom >= fine.shape[0] or right >= fine.shape[1]:
        return None  # reaches the crop's border: not a blob inside the crop
    height, width = bottom - top, right - left
    if max(height, width) > _MAX_ASPECT * min(height, width):
        return None  # elongated: rib, clavicle or vessel
    edge_width = float(np.median((r25 - r75) / np.maximum(r50, 1.0)))
    return _CropBlob((top, left, bottom, right), contrast, edge_width)


def analyse_describe(crop: npt.NDArray[np.generic]) -> str:
    """The demo answer to a describe prompt: margin, shape, density and box of the blob
    nearest the centre of ``crop`` (the second image of the request), box in 0-1000 of
    the crop."""
    gray = _gray(crop)
    blob = _crop_blob(gray)
    reasoning = f"{DEMO_LABEL}: medgemma-node demo engine {DEMO_REVISION}, not MedGemma."
    answer: dict[str, object]
    if blob is None:
        answer = {
            "margin": None,
            "shape": None,
            "density": None,
            "box_2d": None,
            "explanation": (
                f"{DEMO_LABEL}. The demo engine found no bright blob near the centre of the "
                "crop, so it describes nothing."
            ),
        }
    else:
        height, width = blob.box[2] - blob.box[0], blob.box[3] - blob.box[1]
        margin = "smooth" if blob.edge_width <= _SMOOTH_MAX_EDGE_WIDTH else "ill_defined"
        shape = "round" if max(height, width) <= _ROUND_MAX_ASPECT * min(height, width) else "oval"
        density = "solid" if blob.contrast >= _SOLID_MIN_CONTRAST else "ground_glass"
        analysis = (gray.shape[0] // _CROP_FACTOR, gray.shape[1] // _CROP_FACTOR)
        answer = {
            "margin": margin,
            "shape": shape,
            "density": density,
            "box_2d": _to_box_2d(blob.box, analysis),
            "explanation": (
                f"{DEMO_LABEL}. A blob measurement (not a model) of the crop: a "
                f"{ontology.ATTRIBUTES['shape'][shape].en} bright blob with a "
                f"{'sharp' if margin == 'smooth' else 'gradual'} rim and "
                f"{'high' if density == 'solid' else 'low'} contrast to its surroundings."
            ),
        }
    return f"{reasoning}\n\nFinal Answer:\n```json\n{json.dumps(answer)}\n```"


def _region_boxes(lungs: list[_Lung]) -> dict[str, PixelBox]:
    """Boxes (model pixels) of the lungs, their zones (thirds of each lung field's box)
    and the lobes drawn as their usual zones."""
    boxes: dict[str, PixelBox] = {}
    for lung in lungs:
        y0, x0, y1, x1 = lung.box
        third = (y1 - y0) / 3.0
        boxes[f"{lung.side}_lung"] = lung.box
        for index, zone in enumerate(_ZONES):
            boxes[f"{lung.side}_{zone}_zone"] = (
                y0 + index * third,
                x0,
                y0 + (index + 1) * third,
                x1,
            )
    for lobe, zones in _LOBE_ZONES.items():
        parts = [boxes.get(f"{ontology.SITES[lobe].side}_{zone}_zone") for zone in zones]
        if all(part is not None for part in parts):
            found = [part for part in parts if part is not None]
            boxes[lobe] = (
                min(p[0] for p in found),
                min(p[1] for p in found),
                max(p[2] for p in found),
                max(p[3] for p in found),
            )
    if len(lungs) == 2:
        a, b = lungs[0].box, lungs[1].box
        boxes["both_lungs"] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
    return boxes


def analyse_localise(image: npt.NDArray[np.generic], target: str | None) -> str:
    """The demo answer to a localise prompt: the box of ``target`` (a LANDMARKS or SITES
    term) from the lung fields of the whole ``image``; an empty list when the demo cannot
    place it."""
    gray = _gray(image)
    lungs = _lung_fields(gray)
    boxes = _region_boxes(lungs)
    if len(lungs) == 2:
        boxes.update(_landmark_boxes(lungs))
    name = target_name(target) if target is not None else "requested structure"
    reasoning = (
        f"{DEMO_LABEL}: medgemma-node demo engine {DEMO_REVISION}, not MedGemma; boxes "
        f"estimated from the lung fields' geometry. Lung fields found: {len(lungs)}."
    )
    if target is None or target not in boxes:
        reasoning += f" The demo engine cannot place the {name}."
        return f"{reasoning}\n\nFinal Answer:\n```json\n[]\n```"
    item = {"box_2d": _to_box_2d(boxes[target], (gray.shape[0], gray.shape[1])), "label": name}
    return f"{reasoning}\n\nFinal Answer:\n```json\n[{json.dumps(item)}]\n```"


def answer_relation() -> str:
    """The demo answer to a relation prompt: always "uncertain" (it does not assess it)."""
    answer = {
        "connected": "uncertain",
        "explanation": (
            f"{DEMO_LABEL}. The demo engine does not assess whether structures are connected."
        ),
    }
    reasoning = f"{DEMO_LABEL}: medgemma-node demo engine {DEMO_REVISION}, not MedGemma."
    return f"{reasoning}\n\nFinal Answer:\n```json\n{json.dumps(answer)}\n```"


class DemoEngine:
    """Deterministic, non-clinical stand-in for MedGemma; every answer says DEMO.

    Answers the pre-read prompt (recognised by :func:`workers.prompts.is_preread_prompt`)
    from the first (frontal) image, and the follow-up prompts of
    :mod:`workers.dialogue.prompts` (:func:`~workers.dialogue.prompts.followup_task`):
    describe from the crop (second image), localise from the frontal image, relation
    always "uncertain"; and the chest check (yes when it finds two lung fields). Any
    other prompt gets an empty, labelled answer.

    ``delay_seconds`` (``engine.demo_delay_seconds``, for tests of faults during a pre-read):
    each :meth:`generate` call sleeps this long first, like a slow model.
    """

    info = EngineInfo(
        name="demo",
        model_id="medgemma-node/demo-blob-detector",
        revision=DEMO_REVISION,
        is_demo=True,
    )

    def __init__(self, delay_seconds: float = 0.0) -> None:
        if delay_seconds < 0:
            raise ValueError("DemoEngine delay_seconds must be >= 0")
        self.delay_seconds = delay_seconds

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        """One answer per request, in order; the same images give the same text."""
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        return [self._answer(request) for request in requests]

    def _answer(self, request: EngineRequest) -> str:
        if is_preread_prompt(request.prompt):
            if not request.images:
                raise ValueError("EngineRequest.images must hold at least the frontal image")
            return analyse_preread(request.images[0])
        if is_chest_check_prompt(request.prompt):
            if not request.images:
                raise ValueError("EngineRequest.images must hold the image to check")
            return analyse_chest_check(request.images[0])
        task = followup_task(request.prompt)
        if task == "describe":
            if len(request.images) < 2:
                raise ValueError(
                    "EngineRequest.images of a describe prompt must hold the whole image and "
                    "the crop, in that order"
                )
            return analyse_describe(request.images[1])
        if task == "localise":
            if not request.images:
                raise ValueError("EngineRequest.images must hold at least the frontal image")
            return analyse_localise(request.images[0], localise_target(request.prompt))
        if task == "relation":
            return answer_relation()
        return _unsupported_answer()
