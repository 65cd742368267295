"""The pre-read's SR and SEG in the real viewer: OHIF v3 against Orthanc's DICOMweb.

A synthetic chest CR goes through the pipeline's own pieces (imaging, demo engine, parser,
anchors), its SR and SEG are built with sr_templates, and all three are stored in Orthanc.
The built OHIF viewer (@ohif/app) then opens the study in headless Chromium
(tests/ohif.py). Screenshots and the viewer's report go to .ci/artifacts/ohif/.

What OHIF 3.12 does with the node's TID 1410 measurement groups (checked here): it parses
each group (Tracking Identifier, Tracking UID, the NUMs, the Finding Site) and draws it
read-only on the referenced image: the outline, and a text box with one line per NUM
("Long axis: 5.44 mm": concept meaning, value to 2 decimals, UCUM code) and the Finding
Site ("363698007: Upper zone of lung": the concept's code value, the site's meaning; the
laterality modifier is not shown). It does not draw the Tracking Identifier, and its
measurements panel stays empty (a "!" badge: "not compatible"; it tracks only reports in
its own Cornerstone3DTools conventions). The anchor's label shows with the SEG: each
segment is labelled with it in the segmentation panel.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from node.synthetic import make_chest_radiograph, write_study
from sr_templates import codes as c
from sr_templates.model import PrereadResult
from sr_templates.records import ReportedFinding, reported_findings
from sr_templates.report import build_measurement_report
from sr_templates.segmentation import build_segmentation
from sr_templates.series import series_number
from tests import ohif
from tests.peers import OrthancPeer
from workers.engines.demo import DemoEngine
from workers.imaging import choose_views
from workers.preread import analyse_views

ohif_viewer = ohif.ohif_viewer  # the fixture (origin of the viewer reading `orthanc`)

ARTIFACTS = Path(__file__).resolve().parents[1] / ".ci" / "artifacts" / "ohif"

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def preread(image: Dataset) -> PrereadResult:
    """The result record workers.preread.analyse_views makes of a one-image study."""
    frontal, _ = choose_views([image])
    assert frontal is not None
    return analyse_views(DemoEngine(), frontal)


def text_box_lines(finding: ReportedFinding) -> list[str]:
    """The lines OHIF 3.12 draws beside a TID 1410 group: each NUM as "<concept meaning>:
    <value with 2 decimals> <UCUM code>", then "<Finding Site concept code>: <site meaning>"."""
    m = finding.measurements
    assert m is not None and m.units == "mm"
    lines = [
        f"{c.MEASUREMENT_LONG_AXIS.meaning}: {m.long_axis:.2f} {c.UNIT_MM.value}",
        f"{c.MEASUREMENT_SHORT_AXIS.meaning}: {m.short_axis:.2f} {c.UNIT_MM.value}",
        f"{c.MEASUREMENT_AREA.meaning}: {m.area:.2f} {c.UNIT_MM2.value}",
    ]
    if finding.site is not None:
        lines.append(f"363698007: {finding.site.code.meaning}")  # Finding Site (SCT)
    return lines


def is_grey(probe: dict[str, Any], tolerance: int = 6) -> bool:
    """True when the drawn pixel is grey (the image alone), False when tinted (an overlay)."""
    red, green, blue, _alpha = probe["rgba"]
    return max(red, green, blue) - min(red, green, blue) <= tolerance


def keep_artifacts(report: ohif.ViewerReport) -> None:
    """Screenshots and the viewer's report into .ci/artifacts/ohif/ (CI keeps .ci/artifacts)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in report.screenshots:
        shutil.copy2(shot, ARTIFACTS / Path(shot).name)
    (ARTIFACTS / "report.json").write_text(report.explain())


def test_sr_overlays_and_seg_open_in_ohif(
    orthanc: OrthancPeer, ohif_viewer: str, tmp_path: Path
) -> None:
    image = make_chest_radiograph(seed=61, rows=1250, cols=1024, pixel_spacing_mm=0.3)
    source = image.dataset
    assert "ImagerPixelSpacing" in source
    result = preread(source)
    findings = reported_findings(result)
    assert len(findings) == len(image.nodules), result.anchors
    sr = build_measurement_report(
        result, [source], series_number=series_number("sr"), instance_number=1
    )
    seg = build_segmentation(result, source, series_number=series_number("seg"), instance_number=1)
    assert seg is not None
    paths = write_study(tmp_path / "study", [source])
    for ds, name in ((sr, "sr.dcm"), (seg, "seg.dcm")):
        paths.append(tmp_path / name)
        ds.save_as(paths[-1], enforce_file_format=True)
    for path in paths:
        orthanc.upload(path)

    # Probe the drawn pixels at each anchor's centre, and at a control point outside them.
    control = (0.5 * int(source.Columns), 0.12 * int(source.Rows))
    for finding in findings:
        row0, col0, row1, col1 = finding.region.box
        assert not (col0 <= control[0] <= col1 and row0 <= control[1] <= row1)
    centres = [(f.region.center[1], f.region.center[0]) for f in findings]

    report = ohif.open_study(
        ohif_viewer,
        str(source.StudyInstanceUID),
        tmp_path / "screenshots",
        sr_series_uid=str(sr.SeriesInstanceUID),
        seg_series_uid=str(seg.SeriesInstanceUID),
        probe_points=[*centres, control],
    )
    keep_artifacts(report)
    assert report.ok, f"the viewer failed: {report.errors}\n{report.explain()}"
    modalities = sorted(d["Modality"] for d in report.display_sets)
    assert modalities == ["CR", "SEG", "SR"], report.display_sets
    # the image is drawn (grey, not black) at each anchor's centre and the control point
    assert all(is_grey(p) and p["rgba"][0] > 30 for p in report.probe_image), report.probe_image

    # SR: OHIF reads it as a TID 1500 report whose image library lists the CR ...
    assert report.sr is not None
    assert report.sr["isImagingMeasurementReport"] is True
    assert [r["ReferencedSOPInstanceUID"] for r in report.sr["referencedImages"]] == [
        str(source.SOPInstanceUID)
    ]
    # ... one measurement per finding anchor, under its tracking UID and identifier, placed
    # on the CR (the SCOORD's referenced SOP instance) ...
    parsed = {m["TrackingUniqueIdentifier"]: m for m in report.sr["measurements"]}
    assert set(parsed) == {f.tracking_uid for f in findings}, report.sr["measurements"]
    for finding in findings:
        measurement = parsed[finding.tracking_uid]
        assert measurement["TrackingIdentifier"] == finding.tracking_identifier
        assert measurement["loaded"] is True
        assert measurement["ReferencedSOPInstanceUID"] == str(source.SOPInstanceUID)
        assert measurement["graphicType"] == finding.region.graphic()[0]
    # ... drawn as one annotation per anchor on that image ...
    drawn_uids = {
        a["annotationUID"]: a for a in report.sr["annotations"] if a["toolName"] == "DICOMSRDisplay"
    }
    assert set(drawn_uids) == {f.tracking_uid for f in findings}
    for annotation in drawn_uids.values():
        assert str(source.SOPInstanceUID) in annotation["referencedImageId"]
    # ... whose outline (at the anchor, of its size) and text box are in the SVG overlay.
    (layer,) = report.sr["drawn"]
    assert layer["ellipses"] == sum(f.region.graphic()[0] == "ELLIPSE" for f in findings)
    probes = report.sr["probe"]
    (x0, y0), (x1, y1) = probes[0]["canvas"], probes[-1]["canvas"]
    scale = math.dist((x0, y0), (x1, y1)) / math.dist(centres[0], control)  # CSS px / pixel
    for finding, probe in zip(findings, probes[:-1], strict=True):
        if finding.region.graphic()[0] != "ELLIPSE":
            continue
        x, y = probe["canvas"]
        cx, cy, rx, ry = min(layer["ellipseShapes"], key=lambda e: math.dist(e[:2], (x, y)))
        assert math.dist((cx, cy), (x, y)) < 2, (finding.tracking_identifier, probe, layer)
        row0, col0, row1, col1 = finding.region.box
        expected = sorted(((col1 - col0) / 2 * scale, (row1 - row0) / 2 * scale))
        assert sorted((rx, ry)) == pytest.approx(expected, rel=0.1, abs=1), (rx, ry, expected)
    boxes = [box for box in layer["textBoxes"] if box]
    for finding in findings:
        assert text_box_lines(finding) in boxes, (finding.tracking_identifier, boxes)

    # SEG: loaded on the CR, one segment per anchor, labelled with the anchor's identifier,
    # and listed so in the segmentation panel.
    assert report.seg is not None
    (segmentation,) = report.seg["segmentations"]
    assert [s["label"] for s in segmentation["segments"]] == [
        f.tracking_identifier for f in findings
    ]
    shown = [
        r for reps in report.seg["representations"].values() for r in reps
        if r["segmentationId"] == segmentation["segmentationId"]
    ]  # fmt: skip
    assert shown and all(r["type"] == "Labelmap" and r["visible"] for r in shown), shown
    (viewport,) = report.seg["viewports"]["viewports"]
    assert str(source.SOPInstanceUID) in viewport["imageId"]
    # the labelmap is drawn: each anchor's centre is tinted, the control point is not
    for drawn in (report.seg["probeOverlay"], report.seg["probeOpened"]):
        *at_anchors, at_control = drawn
        assert not any(is_grey(p) for p in at_anchors), drawn
        assert is_grey(at_control), drawn
    for finding in findings:
        assert any(finding.tracking_identifier in row for row in report.seg["panelRows"]), (
            report.seg["panelRows"]
        )
