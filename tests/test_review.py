"""The review page (node/review) in headless Chromium, against a node that received a study.

A node runs as `serve` does (NodeRuntime, API on, demo engine); a two-view chest study
arrives by dcmtk storescu; tests/review/driver.mjs opens /review in Debian's Chromium
through playwright-core (the OHIF harness's, tests/ohif.py), first with a wrong token, then
with the right one, opens the study, reads the SVG overlay, probes the drawn pixels, and
asks a question in the box. Screenshots and the driver's report go to
.ci/artifacts/review/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.runtime import NodeRuntime
from node.synthetic import Nodule, make_two_view_study
from tests import ohif
from tests.conftest import make_settings, send_study, wait_for_state

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[1] / ".ci" / "artifacts" / "review"
DRIVER = Path(__file__).resolve().parent / "review" / "driver.mjs"
TOKEN = "review-test-token"
SCOPES = ["system/*.read", "system/Communication.write"]
ROWS, COLS = 1250, 1024
QUESTION = "How far is A1 from the right hilum?"
YELLOW, CYAN = (255, 212, 0), (0, 200, 255)  # findings and landmarks (review.js COLOURS)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[NodeRuntime]:
    tokens = [{"name": "reviewer", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
               "scopes": SCOPES}]  # fmt: skip
    api = {"host": "127.0.0.1", "port": 0}
    settings = make_settings(tmp_path, api=api, auth={"tokens": tokens})
    node = NodeRuntime(settings, embedded=True, api=True)  # what `serve` runs
    node.start()
    node.start_api()
    yield node
    node.stop()


def browser_tools() -> str:
    """Path of ``node``; fails naming the fix when Node.js, Chromium or playwright-core is
    missing (the OHIF harness's requirements)."""
    node = shutil.which("node")
    missing = [
        what
        for what, present in (
            ("Node.js (`node`)", node is not None),
            (f"Chromium ({ohif.CHROMIUM})", os.access(ohif.CHROMIUM, os.X_OK)),
            ("playwright-core", (ohif.OHIF_DIR / "node_modules" / "playwright-core").is_dir()),
        )
        if not present
    ]
    if node is None or missing:
        pytest.fail(f"{', '.join(missing)} missing: run `bash .ci/run` (as root) or "
                    "`bash tests/ohif/install.sh`", pytrace=False)  # fmt: skip
    return node


def drive(url: str, study_uid: str, probe_points: list[tuple[float, float]], shots: Path
          ) -> dict[str, Any]:  # fmt: skip
    request = {
        "url": url, "token": TOKEN, "wrongToken": "not-the-token", "studyUid": study_uid,
        "question": QUESTION, "probePoints": [list(p) for p in probe_points],
        "screenshotDir": str(shots), "chromium": str(ohif.CHROMIUM), "timeoutMs": 90_000,
    }  # fmt: skip
    result = subprocess.run([browser_tools(), str(DRIVER), json.dumps(request)],
                            capture_output=True, text=True, timeout=200, check=False)  # fmt: skip
    try:
        report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(
            f"the driver exited with {result.returncode} without a report:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        ) from None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in report["screenshots"]:
        shutil.copy2(shot, ARTIFACTS / Path(shot).name)
    (ARTIFACTS / "report.json").write_text(json.dumps(report, indent=1))
    return report


def close_to(rgba: list[int], colour: tuple[int, int, int], tolerance: int = 60) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgba[:3], colour, strict=True))


def is_grey(rgba: list[int], tolerance: int = 6) -> bool:
    return max(rgba[:3]) - min(rgba[:3]) <= tolerance


def test_review_page_shows_the_study_and_asks_through_fhir(
    runtime: NodeRuntime, tmp_path: Path
) -> None:
    nodules = (Nodule(0.50 * ROWS, 0.27 * COLS, 18.0), Nodule(0.56 * ROWS, 0.77 * COLS, 15.0))
    images = make_two_view_study(seed=41, rows=ROWS, cols=COLS, pixel_spacing_mm=0.3,
                                 nodules=nodules, accession_number="REV0001")  # fmt: skip
    send_study(runtime, tmp_path / "study", images)
    uid = str(images[0].dataset.StudyInstanceUID)
    study = wait_for_state(runtime, uid, {"done"})
    assert study.result is not None
    result = study.result
    a1 = result.anchor("A1")
    assert a1 is not None and a1.kind == "finding" and a1.region.effective_shape == "ellipse"
    hilum = next(a for a in result.landmarks if a.site == "right_hilum")
    assert runtime.api is not None
    origin = runtime.api.base_url.removesuffix("/fhir")

    # the data routes need the token (the page's HTML does not)
    assert httpx.get(f"{origin}/review").status_code == 200
    for route in ("/review/api/studies", f"/review/api/studies/{uid}/image.png"):
        refused = httpx.get(origin + route, headers={"Authorization": "Bearer not-the-token"})
        assert refused.status_code == 401 and uid not in refused.text

    r0, c0, r1, c1 = a1.region.box
    cr, cc = a1.region.center
    control = (0.5 * COLS, 0.12 * ROWS)  # lung-free, anchor-free
    for anchor in result.anchors:
        assert not anchor.region.contains(control[1], control[0])
    hr0, hc0, _, _ = hilum.region.box
    # the landmark's outline is dashed: its first dash starts at the top left corner
    probes = [(cc, r0), (cc, cr), control, (hc0 + 2, hr0)]
    report = drive(origin, uid, probes, tmp_path / "shots")
    assert report["ok"], f"the page failed: {report['errors']}\n{json.dumps(report)[:6000]}"

    # a wrong token sees no data: refused, nothing listed, nothing kept
    wrong = report["wrongToken"]
    assert "refused" in wrong["error"] and "401" in wrong["error"], wrong
    assert wrong["rows"] == 0 and not wrong["listVisible"] and wrong["stored"] is None
    # every view says AI-generated and preliminary, and DEMO for the demo engine
    before = report["before"]
    for shown in (wrong["banner"], before["banner"], before["studyNotice"], before["caption"]):
        assert "AI-generated, preliminary" in shown and "DEMO - not for clinical use" in shown

    # the study list, then the image the model read with every anchor on it
    assert [s["uid"] for s in report["studies"]] == [uid]
    assert "REV0001" in report["studies"][0]["cells"]
    assert before["viewBox"] == f"0 0 {COLS} {ROWS}"
    assert before["image"]["href"].startswith("blob:")
    drawn = {a["id"]: a for a in before["anchors"]}
    assert set(drawn) == {a.anchor_id for a in result.anchors}
    ellipse = drawn["A1"]
    assert ellipse["element"] == "ellipse" and ellipse["version"] == "1"
    assert ellipse["geometry"] == pytest.approx(
        {"cx": cc, "cy": cr, "rx": (c1 - c0) / 2, "ry": (r1 - r0) / 2}
    )
    assert ellipse["label"] == "A1 right middle zone nodule (v1)"
    assert drawn[hilum.anchor_id]["element"] == "rect"
    assert drawn[hilum.anchor_id]["label"] == f"{hilum.tracking_identifier} (v1)"
    assert any(line.startswith("A1 right middle zone nodule (finding, version 1): ")
               and " mm" in line for line in before["anchorList"])  # fmt: skip
    assert "right middle zone nodule" in before["narrative"]
    assert before["distances"] == [] and before["thread"] == []
    # ... and drawn: the outline's colour on A1's edge and the hilum's, the grey image inside
    # A1 and at the control point
    on_a1, inside_a1, at_control, on_hilum = (p["rgba"] for p in report["probe"])
    assert close_to(on_a1, YELLOW), report["probe"]
    assert close_to(on_hilum, CYAN), report["probe"]
    assert is_grey(inside_a1) and inside_a1[0] > 60, report["probe"]
    assert is_grey(at_control), report["probe"]

    # the question asked in the box, answered in the thread through FHIR $ask; the measured
    # distance is drawn from A1 to the hilum
    after = report["after"]
    (turn,) = after["thread"]
    assert QUESTION in turn["question"]
    (answer,) = turn["answers"]
    assert answer["status"] == "completed" and "mm" in answer["text"], answer
    amended = runtime.ledger.get_study(uid)
    assert amended is not None and amended.result is not None
    (distance,) = amended.result.distances
    (line,) = after["distances"]
    assert (line["from"], line["to"]) == ("A1", hilum.anchor_id)
    (pr0, pc0), (pr1, pc1) = distance.line
    assert line["line"] == pytest.approx([pc0, pr0, pc1, pr1])
    assert line["label"].startswith(f"{distance.tracking_identifier}: {distance.centres:.1f} mm")
    assert "amended revision" in after["title"]
