"""SR (TID 1500) and SEG results of real pre-reads: validity, round trips, amendments, codes.

Results come from the real pipeline: synthetic study files -> workers.preread.analyse_study
(choose views, decode, pad, demo engine, parse, anchors) with a stand-in ledger. Every SR
and SEG is written to bytes, read back with strict value checking, and checked with
dicom3tools' dciodvfy and dcmtk's dsrdump.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr._concepts_dict import concepts as pydicom_concepts
from pydicom.sr.coding import Code
from pydicom.uid import JPEG2000Lossless

from node.synthetic import SyntheticImage, make_chest_radiograph, make_two_view_study, write_study
from sr_templates import codes, ontology
from sr_templates.model import PrereadResult, Region
from sr_templates.report import build_measurement_report
from sr_templates.segmentation import build_segmentation
from sr_templates.series import derived_uid, series_number, series_uid
from tests.peers import dciodvfy_errors, dcmtk, dsrdump_ok
from workers.engines.demo import DemoEngine
from workers.preread import AI_NOTICE, DEMO_NOTICE, analyse_study

SIZE = {"rows": 1250, "cols": 1024}


# ----------------------------------------------------------------------------- helpers


class _Ledger:
    """The two ledger calls analyse_study makes, over files written by the test."""

    def __init__(self) -> None:
        self.paths: list[tuple[int, Path]] = []
        self.results: dict[int, PrereadResult] = {}

    def instances_of(self, study_uid: str, up_to_version: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(path=p) for v, p in self.paths if v <= up_to_version]

    def get_study(self, study_uid: str, version: int) -> SimpleNamespace | None:
        result = self.results.get(version)
        return SimpleNamespace(result=result) if result is not None else None


Preread = Callable[..., dict[str, Any]]


@pytest.fixture
def preread(tmp_path: Path) -> Preread:
    """preread(images, version=1): the analyse_study result once ``images`` arrived.

    Calls for versions 1, 2, ... of one study accumulate, as the ledger does.
    """
    ledger = _Ledger()
    engine = DemoEngine()

    def run(images: list[SyntheticImage], version: int = 1) -> dict[str, Any]:
        for path in write_study(tmp_path / f"v{version}", images):
            ledger.paths.append((version, path))
        study_uid = str(images[0].dataset.StudyInstanceUID)
        typed = analyse_study(ledger, tmp_path, engine, study_uid, version)  # type: ignore[arg-type]
        result = typed.to_json()
        assert PrereadResult.from_json(result) == typed  # the ledger's JSON loses nothing
        ledger.results[version] = typed  # the ledger returns typed results
        return result

    return run


@pytest.fixture
def strict_reading() -> Iterator[None]:
    """Read back with pydicom raising on any invalid value."""
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.reading_validation_mode = mode


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_valid(ds: Dataset, tmp_path: Path, name: str) -> Path:
    """Write ``ds`` to a file; dciodvfy reports no Error, and dsrdump parses an SR."""
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == [], f"{name}: dciodvfy errors"
    if ds.Modality == "SR":
        ok, output = dsrdump_ok(path)
        assert ok, output
    return path


def assert_dsrdump_parses_utf8(path: Path) -> None:
    """dsrdump_ok for non-ASCII text: dsrdump cuts long values inside a UTF-8 sequence,
    which dsrdump_ok (text=True) cannot decode, so its output is decoded leniently here."""
    done = subprocess.run(
        [dcmtk("dsrdump"), str(path)], capture_output=True, timeout=60, check=False
    )
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, output
    assert not any(line.startswith(("E:", "F:")) for line in output.splitlines()), output


def findings_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in result["anchors"] if a["kind"] == "finding"]


def region_of(anchor: dict[str, Any]) -> Region:
    return Region.from_json(anchor["region"])


def typed(result: dict[str, Any]) -> PrereadResult:
    """A result dict (as the tests edit it) as the builders take it."""
    return PrereadResult.from_json(result)


def expected_scoord(region: Region) -> list[tuple[float, float]]:
    """SCOORD points computed by hand, (col, row): an ellipse's major axis ends then minor
    axis ends; a box as a closed polyline."""
    r0, c0, r1, c1 = region.box
    cr, cc = (r0 + r1) / 2, (c0 + c1) / 2
    if region.shape == "ellipse":
        horizontal = [(c0, cr), (c1, cr)]
        vertical = [(cc, r0), (cc, r1)]
        return horizontal + vertical if c1 - c0 >= r1 - r0 else vertical + horizontal
    return [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]


def coded_pairs(value: object) -> Iterator[tuple[str, str, str]]:
    """Every (scheme, code value, meaning) in a dataset, nested sequences included."""
    if isinstance(value, Dataset):
        if "CodeValue" in value and "CodingSchemeDesignator" in value:
            yield (
                str(value.CodingSchemeDesignator),
                str(value.CodeValue),
                str(value.get("CodeMeaning", "")),
            )
        for elem in value:
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from coded_pairs(item)


def dictionary_meanings(scheme: str, value: str) -> set[str]:
    return {
        meaning
        for entry in pydicom_concepts.get(scheme, {}).values()
        for code, (meaning, _cids) in entry.items()
        if code == value
    }


def assert_code_is_sourced(scheme: str, value: str, meaning: str, exact: bool = True) -> None:
    """SCT/DCM codes are pydicom's or, for SCT, on the sourced allow-list.

    exact: the meaning must be the dictionary's too (our codes; highdicom writes some
    meanings in short form, e.g. 260753009 "Source" for "Source (attribute)").
    """
    if scheme == "SCT" and value in codes.SCT_ALLOW_LIST:
        allowed_meaning, source = codes.SCT_ALLOW_LIST[value]
        assert meaning == allowed_meaning and source.strip()
    elif scheme in ("SCT", "DCM"):
        known = dictionary_meanings(scheme, value)
        assert known, f"{scheme} {value} {meaning!r} is neither in pydicom nor allow-listed"
        if exact:
            assert meaning in known, f"{scheme} {value}: {meaning!r} is not one of {known}"
    elif scheme == codes.PRIVATE_SCHEME:
        assert len(value) <= 16
    else:
        assert scheme in ("UCUM", "UMLS", "RFC5646"), f"unexpected coding scheme {scheme}"


# ----------------------------------------------------------------------------- ontology and codes


def test_every_vocabulary_term_has_a_code_and_english_and_chinese_terms() -> None:
    assert set(ontology.ATTRIBUTE_NAMES) == set(ontology.ATTRIBUTES)
    assert ontology.LATERALITY_TERMS == (*ontology.LATERALITIES, "none")
    for concept in ontology.all_concepts():
        assert isinstance(concept.code, Code) and concept.en and concept.zh
    # a site's laterality is its own: both lobes named "upper lobe" differ only by side
    assert ontology.site("right_upper_lobe").laterality_code == codes.LATERALITY_RIGHT
    assert ontology.site("left_upper_lobe").laterality_code == codes.LATERALITY_LEFT
    assert ontology.site("both_lungs").laterality_code == codes.LATERALITY_BILATERAL
    assert ontology.site("mediastinum").laterality_code is None


def test_no_name_means_two_concepts_of_one_kind() -> None:
    # a synonym added to a second finding (or site, or margin value) would make lookup and
    # the answer parser pick one of them silently
    owners: dict[tuple[str, str | None, str], str] = {}
    for concept in ontology.all_concepts():
        names = {n.lower().replace("_", " ").replace("-", " ") for n in concept.names_en}
        names |= {concept.term.replace("_", " "), *concept.names_zh}
        for name in names:
            key = (concept.kind, concept.attribute, name)
            assert owners.setdefault(key, concept.term) == concept.term, (key, owners[key])
            found = ontology.lookup(name, concept.kind, attribute=concept.attribute)
            assert found == concept, (name, concept.term)


def test_sct_codes_are_in_pydicom_dictionary_or_on_the_sourced_allow_list() -> None:
    module_codes = [v for v in vars(codes).values() if isinstance(v, Code)]
    ontology_codes = [concept.code for concept in ontology.all_concepts()]
    assert len(module_codes) > 60
    for code in module_codes + ontology_codes:
        assert_code_is_sourced(code.scheme_designator, code.value, code.meaning)
    # the allow-list holds only what pydicom lacks, and every entry is used
    for value in codes.SCT_ALLOW_LIST:
        assert not dictionary_meanings("SCT", value), f"{value} is in pydicom: not needed"
        assert any(c.value == value for c in module_codes)
    # ambiguous in pydicom (two unrelated meanings): not used for cardiomegaly
    assert ontology.finding("cardiomegaly").code.value == "8186001"


@pytest.mark.parametrize(
    ("text", "kind", "term"),
    [
        ("结节", "finding", "nodule"),
        ("右肺中叶", "site", "right_middle_lobe"),
        ("RML", "site", "right_middle_lobe"),
        ("Right Middle Lobe", "site", "right_middle_lobe"),
        ("ground-glass opacity", "finding", "ground_glass_opacity"),
        ("肺气肿", "finding", "hyperinflation"),
        ("毛刺", "attribute_value", "spiculated"),
        ("隆突", "landmark", "carina"),
        ("ill_defined", "attribute_value", "ill_defined"),
    ],
)
def test_lookup_resolves_english_and_chinese_terms(text: str, kind: str, term: str) -> None:
    concept = ontology.lookup(text)
    assert concept is not None and (concept.kind, concept.term) == (kind, term)


def test_find_terms_reads_a_chinese_follow_up_question() -> None:
    matches = ontology.find_terms("右肺中叶那个圆形影，和右肺门增大有关吗？")
    found = [(m.text, m.concepts[0].term) for m in matches]
    assert found == [
        ("右肺中叶", "right_middle_lobe"),
        ("圆形", "round"),
        ("右肺门", "right_hilum"),
        ("肺门增大", "hilar_enlargement"),
    ]
    # a site that is also a landmark names both, the site first
    assert [c.kind for c in matches[2].concepts] == ["site", "landmark"]
    assert ontology.lookup("右肺门", kind="landmark") == ontology.landmark("right_hilum")
    assert ontology.lookup("no such term") is None


def test_report_statements_match_the_pipeline_notices() -> None:
    assert codes.AI_STATEMENT == AI_NOTICE
    assert codes.DEMO_STATEMENT == DEMO_NOTICE


# ----------------------------------------------------------------------------- SR


def test_report_round_trips_anchors_through_highdicom(
    preread: Preread, tmp_path: Path, strict_reading: None
) -> None:
    pa, lateral = make_two_view_study(seed=61, **SIZE)  # type: ignore[arg-type]
    result = preread([pa, lateral])
    findings = findings_of(result)
    assert len(findings) == 2, result["anchors"]
    findings[0]["attributes"] = {"margin": "spiculated", "density": "part_solid", "shape": "oval"}
    # a box-shaped finding too (a closed POLYLINE), with an allow-listed SNOMED CT code
    findings[1].update(finding="consolidation", label="left lower zone consolidation")
    findings[1]["region"]["shape"] = "rectangle"
    sources = [pa.dataset, lateral.dataset]
    study_uid = str(pa.dataset.StudyInstanceUID)
    sr = build_measurement_report(
        typed(result),
        sources,
        series_number=series_number("sr"),
        instance_number=1,
        sop_instance_uid=derived_uid("sr", study_uid, 1),
    )
    assert_valid(sr, tmp_path, "sr")
    back = hd.sr.srread(io.BytesIO(to_bytes(sr)))

    assert back.StudyInstanceUID == study_uid and back.PatientID == pa.dataset.PatientID
    assert back.SeriesInstanceUID == series_uid("sr", study_uid)
    assert (back.SeriesNumber, back.SOPInstanceUID) == (9001, derived_uid("sr", study_uid, 1))
    report = back.content
    assert report[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = report.get_planar_roi_measurement_groups()
    assert [g.tracking_uid for g in groups] == [a["tracking_uid"] for a in findings]
    assert [g.tracking_identifier for g in groups] == [
        f"{a['anchor_id']} {a['label']}" for a in findings
    ]
    for group, anchor in zip(groups, findings, strict=True):
        assert group.finding_type == ontology.finding(anchor["finding"]).code
        (site,) = group.finding_sites
        concept = ontology.site(anchor["site"])
        assert site.value == concept.code
        assert site.laterality == concept.laterality_code
        # the SCOORD: workers.geometry's points, on the PA image
        region = region_of(anchor)
        expected = expected_scoord(region)
        roi = group.roi
        assert roi is not None
        assert roi.graphic_type.value == ("ELLIPSE" if region.shape == "ellipse" else "POLYLINE")
        np.testing.assert_allclose(roi.value, np.array(expected), atol=1e-3)
        ref = roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == pa.dataset.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == pa.dataset.SOPClassUID
        values = {(m.name.meaning, m.unit.value): m.value for m in group.get_measurements()}
        m = anchor["measurements"]
        assert values == pytest.approx(
            {
                ("Long axis", "mm"): m["long_axis"],
                ("Short axis", "mm"): m["short_axis"],
                ("Area", "mm2"): m["area"],
            }
        )
    evaluations = {
        (q.name.meaning, q.value.meaning) for q in groups[0].get_qualitative_evaluations()
    }
    assert evaluations == {
        ("Margins", "Spiculated"),
        ("Lesion Density", "Part-solid"),
        ("Shape", "Ovoid shape"),
    }
    # landmarks are not measurement groups; every group has both tracking items (OHIF)
    assert len(groups) == len(findings) < len(result["anchors"])
    # the image library lists both views; the algorithm is the device observer
    library = [i for i in report[0].ContentSequence if i.name.value == "111028"]
    images = library[0].ContentSequence[0].ContentSequence
    listed = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images
              if i.ValueType == "IMAGE"}  # fmt: skip
    assert listed == {pa.dataset.SOPInstanceUID, lateral.dataset.SOPInstanceUID}
    (device,) = report.get_observer_contexts(observer_type=codes.Code("121007", "DCM", "Device"))
    assert device.observer_identifying_attributes.model_name == result["model_id"]
    for scheme, value, meaning in coded_pairs(back):
        assert_code_is_sourced(scheme, value, meaning, exact=False)
    assert back.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MGN"


def test_report_says_ai_generated_preliminary_and_demo(preread: Preread, tmp_path: Path) -> None:
    image = make_chest_radiograph(seed=62, **SIZE)  # type: ignore[arg-type]
    result = preread([image])
    sr = build_measurement_report(
        typed(result), [image.dataset], series_number=9001, instance_number=1
    )
    path = assert_valid(sr, tmp_path, "sr")
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    assert sr.SeriesDescription == "DEMO MedGemma pre-read (AI, preliminary)"
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in sr.ContentSequence[-1].ContentSequence
    }
    assert set(texts) == {"Finding", "Impression", "Comment"}
    assert texts["Finding"] == result["findings_text"]
    assert texts["Impression"] == result["impression"]
    assert texts["Comment"].startswith(f"{DEMO_NOTICE}. {AI_NOTICE}.")
    assert result["model_id"] in texts["Comment"] and result["prompt_version"] in texts["Comment"]
    _ok, dump = dsrdump_ok(path)
    assert "Qualitative Evaluations" in dump and "UNVERIFIED" in dump
    # the algorithm of every group: model id, revision, prompt and node versions
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    algorithm = [i for i in groups[0][0].ContentSequence if i.name.meaning.startswith("Algorithm")]
    assert [i.value for i in algorithm] == [
        result["model_id"],
        result["model_revision"],
        f"prompt_version={result['prompt_version']}",
        f"node_version={result['node_version']}",
    ]


def test_monochrome1_dx_jpeg2000_study_gives_valid_sr_and_seg_from_headers(
    preread: Preread, tmp_path: Path
) -> None:
    image = make_chest_radiograph(
        seed=63,
        modality="DX",
        photometric="MONOCHROME1",
        bits_stored=16,
        transfer_syntax=JPEG2000Lossless,
        **SIZE,  # type: ignore[arg-type]
    )
    result = preread([image])
    assert findings_of(result)
    # the builders need the image's header only (workers.results reads no pixel data)
    header = pydicom.dcmread(io.BytesIO(to_bytes(image.dataset)), stop_before_pixels=True)
    assert "PixelData" not in header
    sr = build_measurement_report(typed(result), [header], series_number=9001, instance_number=1)
    seg = build_segmentation(typed(result), header, series_number=9002, instance_number=1)
    assert seg is not None
    assert_valid(sr, tmp_path, "sr")
    assert_valid(seg, tmp_path, "seg")
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == image.dataset.StudyInstanceUID
    assert sr.SeriesInstanceUID != seg.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID \
        == "1.2.840.10008.5.1.4.1.1.1.1"  # fmt: skip


def test_result_without_findings_gives_narrative_sr_and_no_seg(
    preread: Preread, tmp_path: Path, strict_reading: None
) -> None:
    image = make_chest_radiograph(seed=64, nodules=(), **SIZE)  # type: ignore[arg-type]
    result = preread([image])
    assert findings_of(result) == []
    assert (
        build_segmentation(typed(result), image.dataset, series_number=9002, instance_number=1)
        is None
    )
    sr = build_measurement_report(
        typed(result), [image.dataset], series_number=9001, instance_number=1
    )
    assert_valid(sr, tmp_path, "sr")
    back = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    names = [item.name.value for item in back.content[0].ContentSequence]
    assert "126010" not in names and names[-1] == "C0034375"
    assert back.content.get_planar_roi_measurement_groups() == []
    narrative = back.content[0].ContentSequence[-1].ContentSequence
    assert narrative[0].value == result["findings_text"] and "DEMO" in narrative[0].value


def test_no_pixel_spacing_gives_measurements_in_pixels(preread: Preread, tmp_path: Path) -> None:
    image = make_chest_radiograph(seed=65, pixel_spacing_mm=None, **SIZE)  # type: ignore[arg-type]
    result = preread([image])
    findings = findings_of(result)
    assert findings and all(a["measurements"]["units"] == "px" for a in findings)
    sr = build_measurement_report(
        typed(result), [image.dataset], series_number=9001, instance_number=1
    )
    assert_valid(sr, tmp_path, "sr")
    group = hd.sr.srread(io.BytesIO(to_bytes(sr))).content.get_planar_roi_measurement_groups()[0]
    values = {(m.name.meaning, m.unit.value): m.value for m in group.get_measurements()}
    m = findings[0]["measurements"]
    assert values == pytest.approx(
        {
            ("Long axis", "{pixels}"): m["long_axis"],
            ("Short axis", "{pixels}"): m["short_axis"],
            ("Area", "{pixels^2}"): m["area"],
        }
    )
    comment = sr.ContentSequence[-1].ContentSequence[-1].TextValue
    assert "no pixel spacing: sizes are in pixels" in comment
    seg = build_segmentation(typed(result), image.dataset, series_number=9002, instance_number=1)
    assert seg is not None
    assert_valid(seg, tmp_path, "seg")
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert "PixelSpacing" not in measures  # no spacing is invented


def test_chinese_labels_and_latin1_patient_names_survive_in_utf8(
    preread: Preread, tmp_path: Path, strict_reading: None
) -> None:
    image = make_chest_radiograph(seed=70, patient_name="MÜLLER^JÖRG", **SIZE)  # type: ignore[arg-type]
    image.dataset.SpecificCharacterSet = "ISO_IR 100"
    result = preread([image])
    findings_of(result)[0]["label"] = "右上肺野结节"
    result["impression"] = "右上肺野见一结节 (≥ 5 mm)。"
    sr = build_measurement_report(
        typed(result), [image.dataset], series_number=9001, instance_number=1
    )
    seg = build_segmentation(typed(result), image.dataset, series_number=9002, instance_number=1)
    assert seg is not None
    for ds, name in ((sr, "sr"), (seg, "seg")):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        if name == "sr":
            assert_dsrdump_parses_utf8(path)
        back = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == "MÜLLER^JÖRG"
    back_sr = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    group = back_sr.content.get_planar_roi_measurement_groups()[0]
    assert group.tracking_identifier == "A1 右上肺野结节"
    impression = back_sr.ContentSequence[-1].ContentSequence[1]
    assert impression.TextValue == "右上肺野见一结节 (≥ 5 mm)。"
    back_seg = hd.seg.segread(io.BytesIO(to_bytes(seg)))
    assert back_seg.get_segment_description(1).segment_label == "A1 右上肺野结节"
    assert image.dataset.SpecificCharacterSet == "ISO_IR 100"  # the image is left alone


# ----------------------------------------------------------------------------- SEG


def test_segmentation_pixels_match_anchor_regions(
    preread: Preread, tmp_path: Path, strict_reading: None
) -> None:
    image = make_chest_radiograph(seed=66, **SIZE)  # type: ignore[arg-type]
    result = preread([image])
    findings = findings_of(result)
    # a rectangle too: the demo engine only reports round findings
    findings[1]["region"]["shape"] = "rectangle"
    study_uid = str(image.dataset.StudyInstanceUID)
    seg = build_segmentation(
        typed(result),
        image.dataset,
        series_number=series_number("seg"),
        instance_number=1,
        sop_instance_uid=derived_uid("seg", study_uid, 1),
    )
    assert seg is not None
    assert_valid(seg, tmp_path, "seg")
    back = hd.seg.segread(io.BytesIO(to_bytes(seg)))
    assert back.SeriesInstanceUID == series_uid("seg", study_uid)
    assert (back.SeriesNumber, back.StudyInstanceUID) == (9002, study_uid)
    assert back.number_of_segments == len(findings)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[image.dataset.SOPInstanceUID], combine_segments=False
    )[0]
    rows, cols = int(image.dataset.Rows), int(image.dataset.Columns)
    assert pixels.shape == (rows, cols, len(findings))
    for number, anchor in enumerate(findings, 1):
        description = back.get_segment_description(number)
        assert description.tracking_uid == anchor["tracking_uid"]
        assert description.segment_label == f"{anchor['anchor_id']} {anchor['label']}"
        assert description.tracking_id == description.segment_label
        assert description.segmented_property_type == ontology.finding(anchor["finding"]).code
        region = region_of(anchor)
        # independent oracle: workers.geometry's Region.contains at every pixel centre
        r0, c0 = int(region.row0) - 2, int(region.col0) - 2
        r1, c1 = int(region.row1) + 3, int(region.col1) + 3
        expected = np.array(
            [[region.contains(r + 0.5, c + 0.5) for c in range(c0, c1)] for r in range(r0, r1)]
        )
        mask = pixels[:, :, number - 1].astype(bool)
        np.testing.assert_array_equal(mask[r0:r1, c0:c1], expected)
        assert mask.sum() == expected.sum() > 0  # nothing outside the box
    # what OHIF needs on a DX/CR SEG (notes/ohif.md)
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == [float(v) for v in image.dataset.ImagerPixelSpacing]
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == 1.0
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop == [1, 0, 0, 0, 1, 0]
    assert seg.PatientOrientation == image.dataset.PatientOrientation
    assert all("RecommendedDisplayCIELabValue" in item for item in seg.SegmentSequence)
    assert seg.SeriesDescription == "DEMO MedGemma pre-read regions (AI, preliminary)"
    # the finding site and its laterality
    region_item = seg.SegmentSequence[0].AnatomicRegionSequence[0]
    assert region_item.CodeValue == ontology.site(findings[0]["site"]).code.value
    modifier = region_item.AnatomicRegionModifierSequence[0]
    assert modifier.CodeMeaning == ontology.site(findings[0]["site"]).side.capitalize()
    for scheme, value, meaning in coded_pairs(back):
        assert_code_is_sourced(scheme, value, meaning, exact=False)


def test_overlapping_findings_each_keep_their_whole_region_in_the_seg(
    preread: Preread, tmp_path: Path
) -> None:
    """Two findings on the same region: the SEG says its segments overlap, and each
    segment holds every pixel of its region (neither loses the shared pixels)."""
    image = make_chest_radiograph(seed=66, **SIZE)  # type: ignore[arg-type]
    result = preread([image])
    findings = findings_of(result)
    findings[1]["region"] = dict(findings[0]["region"], shape="rectangle")
    seg = build_segmentation(typed(result), image.dataset, series_number=9002, instance_number=1)
    assert seg is not None
    assert_valid(seg, tmp_path, "seg")
    assert seg.SegmentsOverlap == "YES"
    back = hd.seg.segread(io.BytesIO(to_bytes(seg)))
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[image.dataset.SOPInstanceUID], combine_segments=False
    )[0]
    rows, cols = int(image.dataset.Rows), int(image.dataset.Columns)
    for number, anchor in enumerate(findings[:2], 1):
        expected = region_of(anchor).mask(rows, cols)
        np.testing.assert_array_equal(pixels[:, :, number - 1].astype(bool), expected)
    # the ellipse lies inside its box: the shared pixels are in both segments
    assert (pixels[:, :, 0] & pixels[:, :, 1]).sum() == region_of(findings[0]).mask(
        rows, cols
    ).sum()


def test_point_and_zero_width_regions_become_points_and_one_pixel_segments(
    preread: Preread, tmp_path: Path
) -> None:
    image = make_chest_radiograph(seed=71, **SIZE)  # type: ignore[arg-type]
    result = preread([image])
    first, second = findings_of(result)[:2]
    first["region"]["shape"] = "point"
    second["region"]["col1"] = second["region"]["col0"]  # a box without width
    sr = build_measurement_report(
        typed(result), [image.dataset], series_number=9001, instance_number=1
    )
    seg = build_segmentation(typed(result), image.dataset, series_number=9002, instance_number=1)
    assert seg is not None
    assert_valid(sr, tmp_path, "sr")
    assert_valid(seg, tmp_path, "seg")
    groups = hd.sr.srread(io.BytesIO(to_bytes(sr))).content.get_planar_roi_measurement_groups()
    for group, anchor in zip(groups, (first, second), strict=True):
        assert group.roi is not None and group.roi.graphic_type.value == "POINT"
        r = anchor["region"]
        expected = [[(r["col0"] + r["col1"]) / 2, (r["row0"] + r["row1"]) / 2]]
        np.testing.assert_allclose(group.roi.value, expected, atol=1e-3)
    pixels = hd.seg.segread(io.BytesIO(to_bytes(seg))).get_pixels_by_source_instance(
        source_sop_instance_uids=[image.dataset.SOPInstanceUID], combine_segments=False
    )[0]
    assert [int(pixels[:, :, i].sum()) for i in range(2)] == [1, 1]


# ----------------------------------------------------------------------------- amendments, UIDs


def test_amended_report_references_predecessor_and_keeps_tracking_uids(
    preread: Preread, tmp_path: Path
) -> None:
    pa, lateral = make_two_view_study(seed=67, **SIZE)  # type: ignore[arg-type]
    study_uid = str(pa.dataset.StudyInstanceUID)
    v1 = preread([pa], version=1)
    v2 = preread([lateral], version=2)  # the lateral arrives later: a new study version
    assert [a["tracking_uid"] for a in findings_of(v2)] == [
        a["tracking_uid"] for a in findings_of(v1)
    ]
    assert all(a["version"] == 2 for a in findings_of(v2))

    def build(result: dict[str, Any], version: int, sources: list[Dataset],
              predecessor: Dataset | None = None) -> tuple[Dataset, Dataset | None]:  # fmt: skip
        sr = build_measurement_report(
            typed(result), sources, series_number=series_number("sr"), instance_number=version,
            sop_instance_uid=derived_uid("sr", study_uid, version), predecessor=predecessor,
        )  # fmt: skip
        seg = build_segmentation(
            typed(result), pa.dataset, series_number=series_number("seg"), instance_number=version,
            sop_instance_uid=derived_uid("seg", study_uid, version),
        )  # fmt: skip
        return sr, seg

    sr1, seg1 = build(v1, 1, [pa.dataset])
    sr2, seg2 = build(v2, 2, [pa.dataset, lateral.dataset], predecessor=sr1)
    assert seg1 is not None and seg2 is not None
    assert_valid(sr2, tmp_path, "sr2")
    assert_valid(seg2, tmp_path, "seg2")
    (study_item,) = sr2.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == study_uid
    series_item = study_item.ReferencedSeriesSequence[0]
    assert series_item.SeriesInstanceUID == sr1.SeriesInstanceUID
    assert series_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr1.SOPInstanceUID
    # same series, new instances; the tracking UIDs carry over in SR and SEG
    assert sr2.SeriesInstanceUID == sr1.SeriesInstanceUID
    assert sr2.SOPInstanceUID != sr1.SOPInstanceUID
    assert (seg2.SeriesInstanceUID, seg2.InstanceNumber) == (seg1.SeriesInstanceUID, 2)

    def tracking(sr: Dataset) -> list[str]:
        groups = hd.sr.srread(io.BytesIO(to_bytes(sr))).content
        return [g.tracking_uid for g in groups.get_planar_roi_measurement_groups()]

    assert tracking(sr2) == tracking(sr1) == [a["tracking_uid"] for a in findings_of(v1)]
    assert [s.TrackingUID for s in seg2.SegmentSequence] == [
        s.TrackingUID for s in seg1.SegmentSequence
    ]
    # a rebuild of the same (study, version) is the same instance for the PACS
    again, _ = build(v2, 2, [pa.dataset, lateral.dataset], predecessor=sr1)
    assert again.SOPInstanceUID == sr2.SOPInstanceUID


def test_derived_uids_are_stable_per_study_version_kind_and_node() -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    uid = derived_uid("sr", study, 1)
    assert uid == derived_uid("sr", study, 1)
    assert uid.startswith(codes.UID_ROOT) and uid.is_valid and len(uid) <= 64
    others = {
        derived_uid("sr", study, 2),
        derived_uid("seg", study, 1),
        derived_uid("sr", study + "1", 1),
        derived_uid("sr", study, 1, node="OTHER"),
        series_uid("sr", study),
    }
    assert uid not in others and len(others) == 5
    assert series_uid("sr", study) == series_uid("sr", study)
    assert (series_number("sr"), series_number("seg")) == (9001, 9002)
    with pytest.raises(ValueError, match="kind"):
        derived_uid("pdf", study, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version"):
        derived_uid("sr", study, 0)


def test_invalid_inputs_are_refused_with_the_argument_named(preread: Preread) -> None:
    pa, lateral = make_two_view_study(seed=68, **SIZE)  # type: ignore[arg-type]
    result = preread([pa])
    with pytest.raises(ValueError, match="source_datasets"):
        build_measurement_report(
            typed(result), [lateral.dataset], series_number=9001, instance_number=1
        )
    with pytest.raises(ValueError, match="source_datasets"):
        build_measurement_report(typed(result), [], series_number=9001, instance_number=1)
    with pytest.raises(ValueError, match="series_number"):
        build_measurement_report(typed(result), [pa.dataset], series_number=0, instance_number=1)
    with pytest.raises(ValueError, match="source_dataset"):
        build_segmentation(typed(result), lateral.dataset, series_number=9002, instance_number=1)
    bad = dict(result, anchors=[dict(findings_of(result)[0], finding="tumour")])
    with pytest.raises(ValueError, match="finding 'tumour'"):
        build_measurement_report(typed(bad), [pa.dataset], series_number=9001, instance_number=1)
    sr = build_measurement_report(
        typed(result), [pa.dataset], series_number=9001, instance_number=1
    )
    sr.StudyInstanceUID = "1.2.3.4"
    assert pa.dataset.StudyInstanceUID != "1.2.3.4"  # the SR shares no element with the image
    with pytest.raises(ValueError, match="predecessor"):
        build_measurement_report(
            typed(result), [pa.dataset], series_number=9001, instance_number=2, predecessor=sr
        )
