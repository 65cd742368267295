"""The SQL of a search: parsed conditions (:mod:`node.fhir.search`) as WHERE clauses over
the search index, for the store's searches and for matching Subscription criteria."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, false, or_, select
from sqlalchemy.sql.elements import ColumnElement

from node.fhir.models import FhirIndexRow, FhirResourceRow
from node.fhir.search import Condition, date_range

__all__ = ["condition_clause"]


def condition_clause(resource_type: str, cond: Condition) -> ColumnElement[bool]:
    """``FhirResourceRow`` matches ``cond`` (one search parameter, any of its values)."""
    param = cond.param
    if param.index == "_id":
        return FhirResourceRow.resource_id.in_([v for _, v, _ in cond.alternatives])
    matches: list[ColumnElement[bool]] = []
    for head, value, kind in cond.alternatives:
        if kind == "date":
            start, end = date_range(value)
            matches.append(_date_match(head, start, end))
        elif kind == "reference":
            matches.append(FhirIndexRow.value == value)
        elif kind == "id":
            matches.append(FhirIndexRow.value.like(f"%/{_escape_like(value)}", escape="\\"))
        elif kind == "system":
            matches.append(and_(FhirIndexRow.system == head, FhirIndexRow.value == value))
        elif kind == "system-only":
            matches.append(FhirIndexRow.system == head)
        else:
            matches.append(FhirIndexRow.value == value)
    return FhirResourceRow.id.in_(
        select(FhirIndexRow.row_id).where(
            FhirIndexRow.resource_type == resource_type,
            FhirIndexRow.param == param.index,
            or_(*matches) if matches else false(),
        )
    )


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _date_match(prefix: str, start: datetime, end: datetime) -> ColumnElement[bool]:
    """FHIR date prefixes over ranges: the resource's [start, end) against the value's."""
    s, e = FhirIndexRow.date_start, FhirIndexRow.date_end
    if prefix == "eq":
        return and_(s >= start, e <= end)
    if prefix == "ne":
        return or_(s < start, e > end)
    if prefix == "gt":
        return e > end
    if prefix == "lt":
        return s < start
    if prefix == "ge":
        return e > start
    return s < end  # le
