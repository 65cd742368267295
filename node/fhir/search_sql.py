"""The SQL of a search: parsed conditions (:mod:`node.fhir.search`) as WHERE clauses over
the search index, for the store's searches and for matching Subscription criteria."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import and_, false, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from node.fhir.models import FhirIndexRow, FhirResourceRow
from node.fhir.search import Condition, SortKey, date_range

__all__ = ["NO_DATE", "after_clause", "condition_clause", "sort_column"]


def condition_clause(resource_type: str, cond: Condition) -> ColumnElement[bool]:
    """``FhirResourceRow`` matches ``cond`` (one search parameter, any of its values)."""
    param = cond.param
    if param.index == "_id":
        return FhirResourceRow.resource_id.in_([v for _, v, _ in cond.alternatives])
    if param.index == "_lastUpdated":
        return or_(*(_instant_match(head, *date_range(v)) for head, v, _ in cond.alternatives))
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


def _instant_match(prefix: str, start: datetime, end: datetime) -> ColumnElement[bool]:
    """FHIR date prefixes for an instant (meta.lastUpdated) against the value's [start, end)."""
    t = FhirResourceRow.last_updated
    if prefix == "eq":
        return and_(t >= start, t < end)
    if prefix == "ne":
        return or_(t < start, t >= end)
    if prefix == "gt":
        return t >= end
    if prefix == "lt":
        return t < start
    if prefix == "ge":
        return t >= start
    return t < end  # le


#: The sort value of a resource without the date it is sorted by (sorts first ascending).
NO_DATE: Final = datetime(1, 1, 1)


def sort_column(resource_type: str, key: SortKey) -> ColumnElement[Any]:
    """The value a resource is sorted by for ``key``: its lastUpdated, or the earliest start
    of a date parameter (NO_DATE when it has none)."""
    if key.name == "_lastUpdated":
        return FhirResourceRow.last_updated.expression
    earliest = (
        select(func.min(FhirIndexRow.date_start))
        .where(
            FhirIndexRow.row_id == FhirResourceRow.id,
            FhirIndexRow.resource_type == resource_type,
            FhirIndexRow.param == key.name,
        )
        .scalar_subquery()
    )
    return func.coalesce(earliest, NO_DATE)


def after_clause(
    columns: Sequence[tuple[ColumnElement[Any], bool]], values: Sequence[Any]
) -> ColumnElement[bool]:
    """Keyset paging: the rows that sort after ``values`` by ``columns`` (each with its
    direction, descending when True), the last column being unique (the row id)."""
    alternatives: list[ColumnElement[bool]] = []
    for i, (column, descending) in enumerate(columns):
        equal = [c == v for (c, _), v in zip(columns[:i], values[:i], strict=True)]
        beyond = column < values[i] if descending else column > values[i]
        alternatives.append(and_(*equal, beyond))
    return or_(*alternatives)


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
