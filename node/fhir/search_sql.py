"""The SQL of a search: parsed conditions (:mod:`node.fhir.search`) as WHERE clauses over
the search index, for the store's searches and for matching Subscription criteria."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import and_, false, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from node.fhir.models import FhirIndexRow, FhirResourceRow
from node.fhir.search import Condition, SortKey, date_range

__all__ = [
    "NO_DATE",
    "Shape",
    "after_clause",
    "condition_clause",
    "condition_parts",
    "shaped_clause",
    "sort_column",
]


#: The structure of one condition's SQL without its values (hashable: a statement cache key).
Shape = tuple[str, tuple[tuple[str, ...], ...]]


def condition_parts(cond: Condition) -> tuple[Shape, list[Any]]:
    """(shape, values) of ``cond``: the shape decides the SQL, the values fill its bound
    parameters in order (:func:`shaped_clause`). Searches with the same shape share one
    statement, built once; only the values are new (ValueError for a bad date)."""
    index = cond.param.index
    if index == "_id":
        return (index, tuple(("_id",) for _ in cond.alternatives)), [
            v for _, v, _ in cond.alternatives
        ]
    shapes: list[tuple[str, ...]] = []
    values: list[Any] = []
    for head, value, kind in cond.alternatives:
        if index == "_lastUpdated" or kind == "date":
            shapes.append(("instant" if index == "_lastUpdated" else "date", head))
            values.extend(date_range(value))
        elif kind == "id":
            shapes.append(("id",))
            values.append(f"%/{_escape_like(value)}")
        elif kind == "system":
            shapes.append(("system",))
            values.extend((head, value))
        elif kind == "system-only":
            shapes.append(("system-only",))
            values.append(head)
        else:  # a reference or a plain value
            shapes.append(("value",))
            values.append(value)
    return (index, tuple(shapes)), values


def condition_clause(resource_type: str, cond: Condition) -> ColumnElement[bool]:
    """``FhirResourceRow`` matches ``cond`` (one search parameter, any of its values), the
    values inline (Subscription criteria; searches use :func:`shaped_clause`)."""
    shape, values = condition_parts(cond)
    given = iter(values)
    return shaped_clause(resource_type, shape, lambda: next(given))


def shaped_clause(resource_type: str, shape: Shape, take: Callable[[], Any]) -> ColumnElement[bool]:
    """The SQL of a condition of this ``shape``; ``take()`` gives its next value: the
    value itself, or a bound parameter to fill at execution (the order of
    :func:`condition_parts`)."""
    index, alternatives = shape
    if index == "_id":
        return FhirResourceRow.resource_id.in_([take() for _ in alternatives])
    if index == "_lastUpdated":
        return or_(*(_instant_match(a[1], take(), take()) for a in alternatives))
    matches: list[ColumnElement[bool]] = []
    for alt in alternatives:
        kind = alt[0]
        if kind == "date":
            matches.append(_date_match(alt[1], take(), take()))
        elif kind == "id":
            matches.append(FhirIndexRow.value.like(take(), escape="\\"))
        elif kind == "system":
            matches.append(and_(FhirIndexRow.system == take(), FhirIndexRow.value == take()))
        elif kind == "system-only":
            matches.append(FhirIndexRow.system == take())
        else:
            matches.append(FhirIndexRow.value == take())
    return FhirResourceRow.id.in_(
        select(FhirIndexRow.row_id).where(
            FhirIndexRow.resource_type == resource_type,
            FhirIndexRow.param == index,
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
