"""The coded view of a finding anchor, as the SR and SEG write it.

A pre-read result is a :class:`sr_templates.model.PrereadResult`; its finding anchors use
the vocabulary of :mod:`sr_templates.ontology`. :class:`ReportedFinding` pairs one finding
anchor with its ontology concepts (finding, site, laterality, attribute values), checked
once, so the builders never look a term up themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom.sr.coding import Code

from sr_templates import ontology
from sr_templates.model import Anchor, Measurements, PrereadResult, Region
from sr_templates.ontology import ChestConcept

__all__ = ["ReportedFinding", "reported_findings"]


@dataclass(frozen=True)
class ReportedFinding:
    """One finding anchor with its concepts.

    ``side`` is the laterality written with the finding site: the site's own side when it
    has one, else the anchor's laterality. ``attributes`` are (attribute, value) concepts
    in ontology.ATTRIBUTES order.
    """

    anchor: Anchor
    finding: ChestConcept
    site: ChestConcept | None
    side: Literal["right", "left", "bilateral", "none"]
    attributes: tuple[tuple[ChestConcept, ChestConcept], ...]

    @classmethod
    def of(cls, anchor: Anchor) -> ReportedFinding:
        """The concepts of a finding anchor; ValueError names an unknown term."""
        if anchor.kind != "finding" or anchor.finding is None:
            raise ValueError(f"anchor {anchor.anchor_id} is a {anchor.kind}, not a finding")
        finding = ontology.finding(anchor.finding)
        site = ontology.site(anchor.site) if anchor.site is not None else None
        side = site.side if site is not None and site.side != "none" else anchor.laterality
        unknown = set(anchor.attributes) - set(ontology.ATTRIBUTES)
        if unknown:
            raise ValueError(f"anchor {anchor.anchor_id} has unknown attributes {sorted(unknown)}")
        attributes = tuple(
            (
                ontology.ATTRIBUTE_NAMES[name],
                ontology.attribute_value(name, anchor.attributes[name]),
            )
            for name in ontology.ATTRIBUTES
            if name in anchor.attributes
        )
        return cls(anchor, finding, site, side, attributes)

    @property
    def anchor_id(self) -> str:
        return self.anchor.anchor_id

    @property
    def tracking_uid(self) -> str:
        return self.anchor.tracking_uid

    @property
    def tracking_identifier(self) -> str:
        """The SR Tracking Identifier and SEG segment label, e.g. 'A1 right upper zone nodule'."""
        return self.anchor.tracking_identifier

    @property
    def region(self) -> Region:
        return self.anchor.region

    @property
    def measurements(self) -> Measurements | None:
        return self.anchor.measurements

    @property
    def source_sop_instance_uid(self) -> str:
        return self.anchor.source_sop_instance_uid

    @property
    def laterality_code(self) -> Code | None:
        """The CID 244 code of ``side`` (None for "none")."""
        concept = ontology.laterality(self.side)
        return concept.code if concept is not None else None


def reported_findings(result: PrereadResult) -> tuple[ReportedFinding, ...]:
    """The result's finding anchors with their concepts, in anchor order.

    Landmark and region anchors are not findings: they are left out (see README.md,
    "Landmarks").
    """
    return tuple(ReportedFinding.of(a) for a in result.findings)
