"""bench/overhead.py runs end to end on small images (a smoke check; no timing is asserted):
the latency table and its JSON in ``serve`` mode, and the release-gap measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_overhead(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "overhead.py"),
            "--rows",
            "256",
            "--cols",
            "208",
            "--data-dir",
            str(tmp_path / "data"),
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(tmp_path / "overhead.json"),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_overhead_serve_reports_both_targets_against_the_peer(tmp_path: Path) -> None:
    completed = run_overhead(tmp_path, "--count", "2", "--modes", "serve")
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [line.split() for line in completed.stdout.splitlines() if line.startswith("serve ")]
    assert [row[1] for row in rows] == ["pacs", "fhir"]
    assert all(row[2] == "2" and float(row[3]) > 0 for row in rows)  # n and p50
    (summary,) = json.loads((tmp_path / "overhead.json").read_text())["summaries"]
    assert summary["mode"] == "serve" and summary["studies"] == 2
    assert min(summary["peer_p50"], summary["pacs_p50"], summary["fhir_p50"]) > 0
    # every stage of the path came from the ledger; the run's own stages in order (a
    # delivery may be recorded before the run finishes: the SEG leaves first)
    stages = summary["stage_medians"]
    assert set(stages) == {"completed", "queued", "started", "finished", "delivered"}
    run = [stages[n] for n in ("completed", "queued", "started", "finished")]
    assert run == sorted(run)


def test_release_gaps_are_measured_for_each_pair(tmp_path: Path) -> None:
    completed = run_overhead(tmp_path, "--release-gaps", "2")
    assert completed.returncode == 0, completed.stderr[-2000:]
    (line,) = [x for x in completed.stdout.splitlines() if x.startswith("release gaps")]
    assert line.startswith("release gaps, 2 pairs: p50 ")
    p50 = float(line.split("p50 ")[1].split(" s")[0])
    assert 0 < p50 < 30  # the second view arrived before the node's 30 s grace time ended
    (line,) = [x for x in completed.stdout.splitlines() if x.startswith("next-connection")]
    assert line.startswith("next-connection gaps (process start to accept), 2: p50 ")
    p50 = float(line.split("p50 ")[1].split(" s")[0])
    assert 0 < p50 < 10  # storescu connected to the listening socket (10 s: it gives up)
