"""The GPU pre-read benchmark script runs end to end on a tiny CPU config (a smoke check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def test_gpu_preread_tiny_prints_a_results_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu_preread.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_preread.py"),
            "--tiny",
            "--batch",
            "1",
            "2",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.startswith("engine"))
    for column in ("batch", "ttft_s", "decode_tok/s", "studies/h"):
        assert column in header
    rows = [line.split() for line in lines if line.startswith("transformers ")]
    assert [row[1] for row in rows] == ["1", "2"]
    assert any("vllm" in line for line in lines)

    report = json.loads(out.read_text(encoding="utf-8"))
    assert [row["batch"] for row in report["transformers_results"]] == [1, 2]
    assert all(row["studies_per_h"] > 0 for row in report["transformers_results"])
