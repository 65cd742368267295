"""Benchmark scripts run end to end on tiny inputs (smoke checks; no timing is asserted):
the GPU pre-read benchmark on a tiny CPU config, the node memory benchmark on a few small
files against dcmtk storescp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import dcmtk

REPO = Path(__file__).resolve().parents[1]


def test_gpu_preread_tiny_prints_a_results_table(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
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
    # on the CPU the peak is the process's resident set; GPU memory does not exist there
    assert all(row["peak_rss_gb"] > 0 for row in report["transformers_results"])
    assert all("peak_gpu_gb" not in row for row in report["transformers_results"])
    # vLLM's absence is stated, in the JSON and in the output, never left out silently
    assert report["vllm_measured"] is False
    assert "not measured" in report["vllm_results"]
    assert "vllm" in report["ratios"]["vllm_over_transformers"]
    assert set(report["ratios"]["vs_batch1"]["transformers"]) == {"1", "2"}
    assert report["ratios"]["vs_batch1"]["transformers"]["1"]["studies_per_h"] == 1.0
    assert any("NOT measured" in line for line in lines)


def test_node_memory_measures_both_receivers_with_every_file(tmp_path: Path) -> None:
    dcmtk("storescu")  # fails loudly when dcmtk is missing
    dcmtk("storescp")
    out = tmp_path / "node_memory.json"
    argv = [
        sys.executable, str(REPO / "bench" / "node_memory.py"),
        "--associations", "3", "--images", "3", "--rows", "64", "--cols", "64",
        # a run this small lasts a fraction of a second: sample often enough to see it
        "--interval", "0.01", "--pss-every", "1",
        "--data-dir", str(tmp_path / "data"), "--json", str(out),
    ]  # fmt: skip
    completed = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "ours/storescp" in completed.stdout

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["files"] == 9
    assert report["measured"]["commit"]
    runs = {run["receiver"]: run for run in report["runs"]}
    assert set(runs) == {"ours", "storescp"}
    for run in runs.values():
        assert run["files"] == 9  # the script stops with an error when a file is missing
        assert run["samples"] >= 1
        assert 0 < run["idle_rss_mib"] <= run["peak_rss_mib"]
        assert run["median_rss_mib"] <= run["peak_rss_mib"]
        assert 0 < run["peak_pss_mib"] <= run["peak_rss_mib"]
    assert runs["ours"]["peak_processes"] >= 1
    # storescp serves each association in a forked child, which the tree sum includes
    assert runs["storescp"]["peak_processes"] >= 2
    ratio = report["summary"]["ours_over_storescp"]
    for measure in ("peak_rss_mib", "median_rss_mib", "peak_pss_mib", "median_pss_mib"):
        expected = report["summary"]["ours"][measure] / report["summary"]["storescp"][measure]
        assert ratio[measure] == pytest.approx(expected, rel=0.01, abs=0.01)


def test_gpu_preread_followup_cache_reports_every_follow_up_against_its_control(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "followup_cache.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_preread.py"),
            "--tiny",
            "--followup-cache",
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
    result = json.loads(out.read_text(encoding="utf-8"))["followup_cache"]
    for name in ("describe_first", "describe_second", "describe_prefilled", "localise_first"):
        assert result[f"{name}_over_preread"] > 0
        assert result[f"{name}_over_control"] > 0
        assert f"{name}_over_preread" in completed.stdout
    assert result["prefill_crop_s"] > 0
    # per round (warm-up included): the three pre-reads and two controls miss; the first
    # follow-ups, the second describe, the prefill and the prefilled describe hit
    assert (result["cache_hits"], result["cache_misses"]) == (10, 10)
