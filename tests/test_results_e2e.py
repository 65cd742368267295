"""Issue 4's loop: storescu -> node (demo engine) -> SR + SEG -> outbox -> Orthanc, validated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom

from node.outbox import Delivery
from node.runtime import NodeRuntime
from node.synthetic import make_two_view_study
from tests.conftest import send_study, wait_for_state
from tests.peers import OrthancPeer, dciodvfy_errors, dsrdump_ok, wait_for

SIZE = {"rows": 1250, "cols": 1024}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def orthanc_objects(orthanc: OrthancPeer, study_uid: str, sop_class: str) -> list[Path]:
    """The PACS's copies of a study's objects of one SOP class, written to files."""
    out = []
    for instance in orthanc.instances():
        tags = orthanc.instance_tags(instance)
        if tags.get("StudyInstanceUID") == study_uid and tags.get("SOPClassUID") == sop_class:
            path = orthanc.workdir / "fetched" / f"{instance}.dcm"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(orthanc.instance_file(instance))
            out.append(path)
    return out


def test_sr_and_seg_reach_the_pacs_valid_and_in_the_study(
    node_factory: Callable[..., NodeRuntime], orthanc: OrthancPeer, tmp_path: Path
) -> None:
    node = node_factory(
        destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        outbox={"poll_seconds": 0.2},
    )
    pa, lateral = make_two_view_study(seed=61, **SIZE)
    uid = str(pa.dataset.StudyInstanceUID)
    send_study(node, tmp_path / "v1", [pa])
    study = wait_for_state(node, uid, {"done", "failed"}, 120)
    assert study.state.value == "done", study.reason
    assert study.result is not None

    srs = wait_for(lambda: orthanc_objects(orthanc, uid, SR_CLASS), 90, 0.3, "SR in Orthanc")
    segs = wait_for(lambda: orthanc_objects(orthanc, uid, SEG_CLASS), 90, 0.3, "SEG in Orthanc")
    (sr_path,), (seg_path,) = srs, segs
    assert dciodvfy_errors(sr_path) == []
    assert dciodvfy_errors(seg_path) == []
    ok, output = dsrdump_ok(sr_path)
    assert ok, output

    # the anchors round-trip: tracking UIDs of the findings in the SR and the SEG
    findings = {a.tracking_uid for a in study.result.anchors if a.kind == "finding"}
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert {str(g.tracking_uid) for g in groups} == findings
    seg = hd.seg.segread(seg_path)
    assert {str(seg.get_segment_description(n).tracking_uid) for n in seg.segment_numbers} == (
        findings
    )
    text = pydicom.dcmread(sr_path)
    assert text.CompletionFlag == "PARTIAL" and text.VerificationFlag == "UNVERIFIED"
    assert "DEMO - not for clinical use" in str(text.to_json_dict())

    # a late lateral makes version 2: an amended SR that names its predecessor
    send_study(node, tmp_path / "v2", [lateral])
    v2 = wait_for_state(node, uid, {"done"}, 120)
    assert v2.version == 2
    wait_for(lambda: len(orthanc_objects(orthanc, uid, SR_CLASS)) == 2, 90, 0.3, "2 SRs")
    amended = [
        pydicom.dcmread(p)
        for p in orthanc_objects(orthanc, uid, SR_CLASS)
        if "PredecessorDocumentsSequence" in pydicom.dcmread(p, stop_before_pixels=True)
    ]
    assert len(amended) == 1
    first = pydicom.dcmread(sr_path)
    ref = amended[0].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert amended[0].SeriesInstanceUID == first.SeriesInstanceUID  # one SR series per node

    # the SR of v2 is in the PACS; its SEG may still be on the way (its own C-STORE)
    def all_delivered() -> list[Delivery]:
        rows = node.outbox.deliveries(study_uid=uid)
        return rows if {d.state.value for d in rows} == {"delivered"} else []

    deliveries = wait_for(all_delivered, 30, 0.1, "every SR/SEG delivery recorded")
    assert len(deliveries) == 4  # SR + SEG for each version, once each
