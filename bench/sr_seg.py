"""SR + SEG build benchmark: the node's result objects against decoding the image they mark.

One synthetic chest radiograph (CR, 2500 x 2048, 12 bits stored) is written twice, as
Explicit VR Little Endian (uncompressed) and as JPEG 2000 lossless. The pre-read result
comes from the real pipeline on it (decode, pad, demo engine, parse, anchors). Then, per
repeat:

  decode     ``pydicom.dcmread(file).pixel_array`` of each file (the peer: what any
             consumer of the image pays to look at it once);
  build      ``build_measurement_report`` + ``build_segmentation`` from the image headers
             (as workers.results does: ``dcmread(stop_before_pixels=True)``);
  build+enc  the same plus writing both objects to bytes (the files the outbox sends).

With ``--findings`` above the pipeline's count, copies of its finding anchors (shifted,
new tracking UIDs) are added: the SEG grows by one 2500 x 2048 frame per finding.
Reported: the median of ``--repeat`` runs of each, and build / decode ratios.

Usage:
  python bench/sr_seg.py [--repeat 7] [--rows 2500 --cols 2048] [--findings 2 8]
      [--json bench/out/sr_seg.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402

from node.synthetic import make_chest_radiograph, write_study  # noqa: E402
from sr_templates.model import PrereadResult  # noqa: E402
from sr_templates.report import build_measurement_report  # noqa: E402
from sr_templates.segmentation import build_segmentation  # noqa: E402
from sr_templates.series import derived_uid, series_number  # noqa: E402
from workers.engines.demo import DemoEngine  # noqa: E402
from workers.imaging import choose_views  # noqa: E402
from workers.preread import analyse_views  # noqa: E402

SYNTAXES = {"explicit": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless}


def preread_result(path: Path) -> PrereadResult:
    """The pre-read result of one frontal image, made by workers.preread.analyse_views."""
    frontal, _ = choose_views([path])
    assert frontal is not None, f"{path} is not a CR/DX image"
    return analyse_views(DemoEngine(), frontal)


def with_findings(result: PrereadResult, count: int, rows: int, cols: int) -> PrereadResult:
    """``result`` with ``count`` finding anchors: the pipeline's, then shifted copies."""
    findings = list(result.findings)
    if not findings:
        raise SystemExit("the pipeline found no findings on the benchmark image")
    out = findings[:count]
    step = 0
    while len(out) < count:
        step += 1
        base = findings[len(out) % len(findings)]
        dr = (step * 97) % max(1, rows // 4)
        region = replace(
            base.region,
            row0=min(rows - 1.0, base.region.row0 + dr),
            row1=min(rows - 1.0, base.region.row1 + dr),
        )
        out.append(
            replace(
                base, anchor_id=f"A{100 + len(out)}", tracking_uid=generate_uid(),
                label=f"copy {step} of {base.label}", region=region,
            )
        )  # fmt: skip
    others = [a for a in result.anchors if a.kind != "finding"]
    return replace(result, anchors=(*out, *others))


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--findings", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "sr_seg.json")
    args = parser.parse_args(argv)
    if args.repeat < 1 or any(n < 1 for n in args.findings):
        parser.error("--repeat and --findings must be >= 1")

    with tempfile.TemporaryDirectory(prefix="bench-sr-seg-") as tmp:
        files: dict[str, Path] = {}
        for name, syntax in SYNTAXES.items():
            image = make_chest_radiograph(
                rows=args.rows, cols=args.cols, seed=7, transfer_syntax=syntax
            )
            (files[name],) = write_study(Path(tmp) / name, [image])
        sizes = {name: path.stat().st_size for name, path in files.items()}
        result = preread_result(files["explicit"])
        header = pydicom.dcmread(files["explicit"], stop_before_pixels=True)
        study_uid = str(header.StudyInstanceUID)

        decode = {
            name: median_seconds(lambda p=path: pydicom.dcmread(p).pixel_array, args.repeat)
            for name, path in files.items()
        }
        check = pydicom.dcmread(files["j2k"]).pixel_array
        assert np.array_equal(check, pydicom.dcmread(files["explicit"]).pixel_array)

        rows_out: list[dict[str, Any]] = []
        for count in args.findings:
            study = with_findings(result, count, args.rows, args.cols)

            def build(study: PrereadResult = study) -> tuple[Dataset, Dataset | None]:
                sr = build_measurement_report(
                    study, [header], series_number=series_number("sr"), instance_number=1,
                    sop_instance_uid=derived_uid("sr", study_uid, 1),
                )  # fmt: skip
                seg = build_segmentation(
                    study, header, series_number=series_number("seg"), instance_number=1,
                    sop_instance_uid=derived_uid("seg", study_uid, 1),
                )  # fmt: skip
                return sr, seg

            def build_and_encode(study: PrereadResult = study) -> int:
                sr, seg = build(study)
                return len(to_bytes(sr)) + (len(to_bytes(seg)) if seg is not None else 0)

            build()  # warm-up: imports, highdicom caches
            sr, seg = build()
            build_s = median_seconds(build, args.repeat)
            encode_s = median_seconds(build_and_encode, args.repeat)
            rows_out.append(
                {
                    "findings": count,
                    "build_s": build_s,
                    "build_encode_s": encode_s,
                    "sr_bytes": len(to_bytes(sr)),
                    "seg_bytes": len(to_bytes(seg)) if seg is not None else 0,
                    "ratio_build_to_decode": {n: build_s / t for n, t in decode.items()},
                    "ratio_build_encode_to_decode": {n: encode_s / t for n, t in decode.items()},
                }
            )

    print(f"image {args.rows} x {args.cols}, median of {args.repeat} runs")
    for name, seconds in decode.items():
        print(f"decode {name:<9} {seconds * 1000:9.1f} ms   file {sizes[name] / 1e6:6.2f} MB")
    print()
    print(
        f"{'findings':>8} {'build_ms':>9} {'build+enc_ms':>12} {'sr_kB':>7} {'seg_kB':>7} "
        f"{'/dec_explicit':>13} {'/dec_j2k':>9} {'(+enc)/dec_explicit':>19} {'(+enc)/dec_j2k':>14}"
    )
    for row in rows_out:
        rb, re_ = row["ratio_build_to_decode"], row["ratio_build_encode_to_decode"]
        print(
            f"{row['findings']:>8} {row['build_s'] * 1000:>9.1f} "
            f"{row['build_encode_s'] * 1000:>12.1f} {row['sr_bytes'] / 1e3:>7.1f} "
            f"{row['seg_bytes'] / 1e3:>7.1f} {rb['explicit']:>13.2f} {rb['j2k']:>9.3f} "
            f"{re_['explicit']:>19.2f} {re_['j2k']:>14.3f}"
        )
    report = {
        "benchmark": "sr_seg",
        "image": {"rows": args.rows, "cols": args.cols, "file_bytes": sizes},
        "repeat": args.repeat,
        "decode_s": decode,
        "results": rows_out,
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "highdicom": __import__("highdicom").__version__,
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
