"""The FHIR resource store: resources in the node's database and their search index.

Every write of a resource is one transaction that also rewrites its search index and, for
a type Subscriptions can watch, queues the notifications its new version matches
(:func:`node.fhir.subscriptions.queue_notifications`, in the same transaction), so a
notification is never lost between the write and the sender. Other rows that must be
committed with a resource (a follow-up job with its question) use :meth:`FhirStore.writing`.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from typing import Any, Final, cast

from sqlalchemy import (
    DateTime,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ClauseElement, ColumnElement

from node.db import Database, make_engine, utcnow
from node.fhir.models import FHIR_TABLES, FhirHistoryRow, FhirIndexRow, FhirResourceRow
from node.fhir.search import Condition, Cursor, IndexValue, SortKey, index_values
from node.fhir.search_sql import (
    NO_DATE,
    Shape,
    after_clause,
    condition_parts,
    shaped_clause,
    sort_column,
)
from node.fhir.subscriptions import drop_pending, queue_notifications
from node.ledger import StudyLedger

#: Elements that change on every write without changing the content (kept when equal).
_VOLATILE: Final = ("meta", "issued", "recorded")

#: Types whose earlier versions are not kept (vread serves only the current version): a
#: Subscription's versions are the server's status bookkeeping, and its channel headers
#: (credentials) should not be copied.
NO_HISTORY: Final = frozenset({"Subscription"})


#: The columns of a StoredResource, in its field order (reads skip ORM objects).
_COLUMNS: Final = (
    FhirResourceRow.resource_type,
    FhirResourceRow.resource_id,
    FhirResourceRow.version_id,
    FhirResourceRow.last_updated,
    FhirResourceRow.body,
)
_HISTORY_COLUMNS: Final = (
    FhirHistoryRow.resource_type,
    FhirHistoryRow.resource_id,
    FhirHistoryRow.version_id,
    FhirHistoryRow.last_updated,
    FhirHistoryRow.body,
)


#: One resource by type and id (built once: building a statement costs more than running it).
_GET: Final = select(*_COLUMNS).where(
    FhirResourceRow.resource_type == bindparam("rtype"),
    FhirResourceRow.resource_id == bindparam("rid"),
)


#: Bulk inserts of new resources (their row ids in the order given) and of index rows.
_RESOURCES: Final = cast(Table, FhirResourceRow.__table__)
_INSERT_RESOURCES: Final = insert(_RESOURCES).returning(
    _RESOURCES.c.id, sort_by_parameter_order=True
)
_INDEX: Final = cast(Table, FhirIndexRow.__table__)
_INSERT_INDEX: Final = insert(_INDEX)
_INSERT_RESOURCE: Final = insert(_RESOURCES).returning(_RESOURCES.c.id)


class _DriverQuery:
    """A prebuilt SELECT compiled once for the SQLite driver: its SQL, its parameters in
    order with their bind processors, and the result processors of its columns."""

    def __init__(self, statement: Executable, engine: Engine) -> None:
        dialect = engine.dialect
        compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=dialect))
        binds = compiled.binds
        if any(b.expanding for b in binds.values()) or compiled.positiontup is None:
            raise ValueError("not a plain positional statement")  # SqliteDriver falls back
        self.statement = statement
        self.sql = compiled.string
        self.params = [
            (
                name,
                binds[name].value,
                binds[name].type.dialect_impl(dialect).bind_processor(dialect),
            )
            for name in compiled.positiontup
        ]
        columns = getattr(statement, "selected_columns", ())
        self.results = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]

    def run(self, raw: Any, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        given = []
        for name, default, process in self.params:
            value = params.get(name, default)
            given.append(process(value) if process is not None else value)
        rows = raw.execute(self.sql, given).fetchall()
        if not any(self.results):
            return rows
        results = self.results
        return [
            tuple(p(v) if p is not None else v for p, v in zip(results, row, strict=True))
            for row in rows
        ]


class SqliteDriver:
    """The store's hot statements run on the SQLite driver itself.

    SQLAlchemy's execution of a prebuilt statement (cache key, parameter processing, result
    object) cost several times the statement itself: a read by id 80 -> 25 us, and a bulk
    insert's per-row parameter processing about 0.2 ms CPU per AuditEvent (6 index rows
    each). Here the statements are the same ones compiled once (:meth:`query`) or plain
    INSERTs of the same columns; parameters and results pass through SQLAlchemy's own
    type processors (the stored text of a timestamp is the same). Inserts run on the
    write transaction's connection, reads on a pooled connection as before. SQLite only
    (:meth:`for_engine` is None on other databases, which keep the Core statements)."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        processor = DateTime().dialect_impl(dialect).bind_processor(dialect)
        self._datetime: Callable[[datetime | None], Any] = processor or (lambda v: v)
        quote = dialect.identifier_preparer.quote

        def statement(table: Table, columns: Sequence[str]) -> str:
            names = ", ".join(quote(c) for c in columns)
            marks = ", ".join("?" for _ in columns)
            return f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks})"

        self._resource = statement(
            _RESOURCES, ("resource_type", "resource_id", "version_id", "last_updated", "body")
        )
        self._index = statement(
            _INDEX,
            ("row_id", "resource_type", "param", "system", "value", "date_start", "date_end"),
        )

        self._engine = engine
        self._queries: dict[int, _DriverQuery] = {}

    @classmethod
    def for_engine(cls, engine: Engine) -> SqliteDriver | None:
        return cls(engine) if engine.dialect.name == "sqlite" else None

    def _query(self, statement: Executable) -> _DriverQuery | None:
        query = self._queries.get(id(statement))
        if query is None or query.statement is not statement:
            if len(self._queries) > 2048:  # statements are module constants or LRU-cached
                self._queries.clear()
            try:
                query = _DriverQuery(statement, self._engine)
            except ValueError:  # e.g. an expanding IN: SQLAlchemy runs it
                return None
            self._queries[id(statement)] = query
        return query

    def query(
        self, statements: Sequence[Executable], params: Mapping[str, Any]
    ) -> list[list[tuple[Any, ...]]]:
        """The rows of each statement, run in turn on one pooled connection."""
        queries = [self._query(s) for s in statements]
        if any(q is None for q in queries):
            with self._engine.connect() as conn:
                return [[tuple(r) for r in conn.execute(s, params)] for s in statements]
        raw = self._engine.raw_connection()
        try:
            return [q.run(raw.driver_connection, params) for q in queries if q is not None]
        finally:
            raw.close()

    def resources(
        self, conn: Connection, rows: Sequence[tuple[str, str, int, datetime, str]]
    ) -> list[int]:
        """Insert (type, id, version, last updated, body) rows; their row ids in order."""
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            ids = []
            for rtype, rid, version, updated, body in rows:
                cursor.execute(self._resource, (rtype, rid, version, self._datetime(updated), body))
                ids.append(int(cursor.lastrowid))
            return ids
        finally:
            cursor.close()

    def index(self, conn: Connection, rows: Iterable[tuple[int, str, IndexValue]]) -> None:
        """Insert the index rows of (row id, resource type, value)."""
        stamp = self._datetime
        params = [
            (row_id, rtype, v.param, v.system[:256], v.value[:512], stamp(v.start), stamp(v.end))
            for row_id, rtype, v in rows
        ]
        if not params:
            return
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(self._index, params)
        finally:
            cursor.close()


@lru_cache(maxsize=64)
def _get_many(n: int) -> Executable:
    """``n`` resources by (type, id): parameters ``t0``, ``i0``, ``t1``, ``i1``..."""
    return select(*_COLUMNS).where(
        or_(
            *(
                and_(
                    FhirResourceRow.resource_type == bindparam(f"t{k}"),
                    FhirResourceRow.resource_id == bindparam(f"i{k}"),
                )
                for k in range(n)
            )
        )
    )


def _iso(ts: datetime) -> str:
    """A naive-UTC timestamp as a FHIR instant."""
    return ts.replace(tzinfo=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(resource: Mapping[str, Any]) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))


def new_id() -> str:
    """A new server-assigned resource id."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class StoredResource:
    """The current version of a stored resource; ``body`` is its JSON as served."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    body: str

    @cached_property
    def resource(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'


class StoreWrite:
    """One write transaction of the store: resources through :meth:`put`, other rows of the
    FHIR tables through :attr:`session`; all committed together, or none."""

    def __init__(self, session: Session, driver: SqliteDriver | None = None) -> None:
        self.session = session
        self._driver = driver

    def get(self, resource_type: str, resource_id: str) -> StoredResource | None:
        row = self.session.execute(
            select(*_COLUMNS).where(
                FhirResourceRow.resource_type == resource_type,
                FhirResourceRow.resource_id == resource_id,
            )
        ).first()
        return StoredResource(*row) if row else None

    def put(
        self, resource: Mapping[str, Any], *, notify: bool = True, new: bool = False
    ) -> StoredResource:
        """Write one resource (it must have an id): a new version only when the content
        changed, its search index, and (``notify``) its Subscription notifications.

        ``new``: the id was just minted (uuid4), so there is no version to compare. Core
        statements, not ORM objects: this is the hot path of $ask.
        """
        s = self.session
        conn = s.connection()  # inserts as Core statements: no ORM bookkeeping
        rtype = str(resource["resourceType"])
        rid = str(resource["id"])
        old = None
        if not new:
            old = s.execute(
                select(
                    FhirResourceRow.id,
                    FhirResourceRow.version_id,
                    FhirResourceRow.last_updated,
                    FhirResourceRow.body,
                )
                .where(FhirResourceRow.resource_type == rtype, FhirResourceRow.resource_id == rid)
                .with_for_update()
            ).first()
        if old is not None:
            content = {k: v for k, v in resource.items() if k not in _VOLATILE}
            previous = json.loads(old.body)
            if {k: v for k, v in previous.items() if k not in _VOLATILE} == content:
                return StoredResource(rtype, rid, old.version_id, _parse_iso(previous), old.body)
        now = utcnow()
        version = 1 if old is None else old.version_id + 1
        meta = dict(resource.get("meta") or {})
        meta.update(versionId=str(version), lastUpdated=_iso(now))
        body = {"resourceType": rtype, "id": rid, "meta": meta}
        body.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta"))
        text = _dumps(body)
        if new and self._driver is not None:  # a fresh id: no unique clash to retry
            (row_id,) = self._driver.resources(conn, [(rtype, rid, version, now, text)])
        elif old is None:
            row_id = conn.execute(
                _INSERT_RESOURCE,
                {
                    "resource_type": rtype,
                    "resource_id": rid,
                    "version_id": version,
                    "last_updated": now,
                    "body": text,
                },
            ).scalar_one()
        else:
            row_id = old.id
            if rtype not in NO_HISTORY:
                s.execute(
                    insert(FhirHistoryRow),
                    {
                        "resource_type": rtype,
                        "resource_id": rid,
                        "version_id": old.version_id,
                        "last_updated": old.last_updated,
                        "body": old.body,
                    },
                )
            s.execute(
                update(FhirResourceRow)
                .where(FhirResourceRow.id == row_id)
                .values(version_id=version, last_updated=now, body=text)
            )
            s.execute(delete(FhirIndexRow).where(FhirIndexRow.row_id == row_id))
        if self._driver is not None:  # the driver's cursor: see SqliteDriver
            self._driver.index(conn, ((row_id, rtype, v) for v in index_values(body)))
        elif index_rows := [_index_row(row_id, rtype, v) for v in index_values(body)]:
            conn.execute(_INSERT_INDEX, index_rows)
        if notify:
            queue_notifications(s, row_id, rtype, rid, version)
        return StoredResource(rtype, rid, version, now, text)


class FhirStore:
    """FHIR resources in the node's database (the ledger's, or its own URL)."""

    def __init__(self, target: StudyLedger | Engine | str, *, pool_size: int = 0) -> None:
        """On a ledger's (or a given) engine, or a database URL: its own engine, whose
        connection pool keeps ``pool_size`` connections (0: the ledger's defaults)."""
        self._owns_engine = isinstance(target, str)
        if isinstance(target, StudyLedger):
            self.db = target.db
        elif isinstance(target, str):
            self.db = Database(make_engine(target, pool_size=max(pool_size, 0)))
        else:
            self.db = Database(target)
        self.engine = self.db.engine
        self.db.create_tables(FHIR_TABLES)  # missing columns of an older version added too
        self._write_lock = threading.Lock()  # one writer per process; SQLite serialises anyway
        self._driver = SqliteDriver.for_engine(self.engine)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    @contextmanager
    def writing(self) -> Iterator[StoreWrite]:
        """One write transaction, as this process's single writer (see :class:`StoreWrite`)."""
        with self._write_lock, self.db.transaction() as session:
            yield StoreWrite(session, self._driver)

    # --- resources --------------------------------------------------------------------

    def rows(self, statement: Executable, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of a prebuilt SELECT (built once, with bound parameters), on a pooled
        connection; on SQLite through the driver (:class:`SqliteDriver`)."""
        if self._driver is not None:
            return self._driver.query([statement], params)[0]
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(statement, params)]

    def get(self, resource_type: str, resource_id: str) -> StoredResource | None:
        rows = self.rows(_GET, {"rtype": resource_type, "rid": resource_id})
        return StoredResource(*rows[0]) if rows else None

    def version(self, resource_type: str, resource_id: str, version: int) -> StoredResource | None:
        """One version of a resource (vread): the current one or a kept earlier one."""
        current = self.get(resource_type, resource_id)
        if current is None or current.version_id == version:
            return current
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_HISTORY_COLUMNS).where(
                    FhirHistoryRow.resource_type == resource_type,
                    FhirHistoryRow.resource_id == resource_id,
                    FhirHistoryRow.version_id == version,
                )
            ).first()
            return StoredResource(*row) if row else None

    def history(self, resource_type: str, resource_id: str) -> list[StoredResource]:
        """Every kept version of a resource, newest first (empty: no such resource)."""
        with self.db.transaction() as s:
            current = s.execute(
                select(*_COLUMNS).where(
                    FhirResourceRow.resource_type == resource_type,
                    FhirResourceRow.resource_id == resource_id,
                )
            ).first()
            if current is None:
                return []
            older = s.execute(
                select(*_HISTORY_COLUMNS)
                .where(
                    FhirHistoryRow.resource_type == resource_type,
                    FhirHistoryRow.resource_id == resource_id,
                    FhirHistoryRow.version_id < current.version_id,
                )
                .order_by(FhirHistoryRow.version_id.desc())
            ).all()
        return [StoredResource(*current), *(StoredResource(*r) for r in older)]

    def put(self, resource: Mapping[str, Any]) -> StoredResource:
        """Create or update one resource (it must have an id); see :meth:`put_many`."""
        return self.put_many([resource])[0]

    def put_many(
        self, resources: Sequence[Mapping[str, Any]], *, notify: bool = True
    ) -> list[StoredResource]:
        """Write resources in one transaction: a new version only when the content changed.

        Each new version of a DiagnosticReport or Communication queues a notification for
        every active Subscription it matches (``notify=False`` skips that: AuditEvents).
        """
        for attempt in range(3):
            try:
                with self.writing() as w:
                    return [w.put(r, notify=notify) for r in resources]
            except IntegrityError:  # a concurrent writer created the same id first
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def insert_new(self, resources: Sequence[Mapping[str, Any]]) -> int:
        """Insert resources that are new by construction (AuditEvents: fresh uuid4 ids) in
        two bulk statements: no version check, no Subscription matching."""
        if not resources:
            return 0
        now = utcnow()
        rows: list[tuple[str, str, int, datetime, str]] = []
        values: list[list[IndexValue]] = []
        for resource in resources:
            meta = dict(resource.get("meta") or {})
            meta.update(versionId="1", lastUpdated=_iso(now))
            body = {"resourceType": resource["resourceType"], "id": resource["id"], "meta": meta}
            body.update(
                (k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta")
            )
            rows.append((str(resource["resourceType"]), str(resource["id"]), 1, now, _dumps(body)))
            values.append(index_values(body))
        with self.writing() as w:
            conn = w.session.connection()  # Core statements: no ORM bookkeeping per row
            ids: Sequence[int]
            if self._driver is not None:  # SQLite: the driver's cursor (SqliteDriver)
                ids = self._driver.resources(conn, rows)
            else:
                columns = ("resource_type", "resource_id", "version_id", "last_updated", "body")
                named = [dict(zip(columns, row, strict=True)) for row in rows]
                ids = conn.execute(_INSERT_RESOURCES, named).scalars().all()
            indexed = [
                (row_id, row[0], v)
                for row_id, row, vals in zip(ids, rows, values, strict=True)
                for v in vals
            ]
            if self._driver is not None:
                self._driver.index(conn, indexed)
            elif indexed:
                conn.execute(_INSERT_INDEX, [_index_row(*i) for i in indexed])
        return len(rows)

    def delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete a resource (a Subscription: with its pending notifications)."""
        with self.writing() as w:
            s = w.session
            row = s.execute(
                select(FhirResourceRow).where(
                    FhirResourceRow.resource_type == resource_type,
                    FhirResourceRow.resource_id == resource_id,
                )
            ).scalar_one_or_none()
            if row is None:
                return False
            s.execute(delete(FhirIndexRow).where(FhirIndexRow.row_id == row.id))
            s.execute(
                delete(FhirHistoryRow).where(
                    FhirHistoryRow.resource_type == resource_type,
                    FhirHistoryRow.resource_id == resource_id,
                )
            )
            s.delete(row)
            if resource_type == "Subscription":
                drop_pending(s, resource_id)
            return True

    # --- search -----------------------------------------------------------------------

    def search(
        self,
        resource_type: str,
        conditions: Sequence[Condition],
        *,
        count: int,
        offset: int = 0,
    ) -> tuple[int, list[StoredResource]]:
        """(total, one page of matches), newest first."""
        page = self.search_page(resource_type, conditions, count=count, offset=offset)
        return page.total, page.resources

    def search_page(
        self,
        resource_type: str,
        conditions: Sequence[Condition],
        *,
        count: int,
        sort: Sequence[SortKey] = (SortKey("_lastUpdated", True),),
        offset: int = 0,
        after: Cursor | None = None,
    ) -> SearchPage:
        """One page of matches in ``sort`` order (ties: by row), from ``offset`` or after
        the ``after`` cursor, within its snapshot: resources changed after the first page
        was served are left out, so following the cursors never repeats or skips one.

        The statements come from :func:`_search_statements` (one per shape of search,
        built once), run on a plain connection: building SQLAlchemy expressions and an ORM
        session cost several times the query itself."""
        snapshot = after.snapshot if after is not None else utcnow()
        shapes: list[Shape] = []
        values: list[Any] = []
        for cond in conditions:
            shape, given = condition_parts(cond)
            shapes.append(shape)
            values.extend(given)
        params: dict[str, Any] = {f"p{i}": v for i, v in enumerate(values)}
        params.update(rtype=resource_type, snapshot=snapshot)
        sort = tuple(sort)
        rows_sql, count_sql = _search_statements(
            resource_type, tuple(shapes), sort, after is not None
        )
        if after is not None:
            cursor_values = [_cursor_value(v) for v in after.values]
            params.update((f"a{i}", v) for i, v in enumerate([*cursor_values, after.row]))
        params["limit"], params["offset"] = count + 1, 0 if after is not None else offset
        if self._driver is not None:
            rows, total = self._driver_page(rows_sql, count_sql, params, count, offset, after)
        else:
            rows, total = self._page(rows_sql, count_sql, params, count, offset, after)
        more = len(rows) > count
        rows = rows[:count]
        cursor = None
        if more:
            last = rows[-1]
            sort_values = tuple(_cursor_text(v) for v in last[len(_COLUMNS) : -1])
            cursor = Cursor(snapshot, sort_values, int(last[-1]))
        return SearchPage(total, [StoredResource(*r[: len(_COLUMNS)]) for r in rows], cursor)

    def _page(
        self,
        rows_sql: Executable,
        count_sql: Executable,
        params: Mapping[str, Any],
        count: int,
        offset: int,
        after: Cursor | None,
    ) -> tuple[Sequence[Any], int]:
        """(up to ``count`` + 1 rows, the total) of :meth:`search_page`."""
        with self.engine.connect() as conn:
            rows: Sequence[Any] = conn.execute(rows_sql, params).all() if count > 0 else []
            if after is None and count > 0 and len(rows) <= count:
                return rows, offset + len(rows)  # the last page: nothing to count
            return rows, int(conn.execute(count_sql, params).scalar_one())

    def _driver_page(
        self,
        rows_sql: Executable,
        count_sql: Executable,
        params: Mapping[str, Any],
        count: int,
        offset: int,
        after: Cursor | None,
    ) -> tuple[Sequence[Any], int]:
        """:meth:`_page` on the SQLite driver (one connection, the same statements)."""
        assert self._driver is not None
        if count <= 0:
            ((total,),) = self._driver.query([count_sql], params)[0]
            return [], int(total)
        (rows,) = self._driver.query([rows_sql], params)
        if after is None and len(rows) <= count:
            return rows, offset + len(rows)  # the last page: nothing to count
        ((total,),) = self._driver.query([count_sql], params)[0]
        return rows, int(total)

    def get_many(self, refs: Iterable[tuple[str, str]]) -> list[StoredResource]:
        """Stored resources for (type, id) pairs, in the given order; missing ones skipped."""
        wanted = list(dict.fromkeys(refs))
        if not wanted:
            return []
        params: dict[str, str] = {}
        for n, (rtype, rid) in enumerate(wanted):
            params[f"t{n}"], params[f"i{n}"] = rtype, rid
        rows = self.rows(_get_many(len(wanted)), params)
        found = {(r[0], r[1]): StoredResource(*r) for r in rows}
        return [found[k] for k in wanted if k in found]

    def referencing(
        self, source_type: str, param: str, targets: Sequence[StoredResource]
    ) -> list[StoredResource]:
        """The resources of ``source_type`` whose reference parameter ``param`` (an index
        name) points at one of ``targets``: what ``_revinclude`` adds."""
        if not targets:
            return []
        refs = sorted({f"{t.resource_type}/{t.id}" for t in targets})
        with self.db.transaction() as s:
            rows = s.execute(
                select(*_COLUMNS)
                .where(
                    FhirResourceRow.resource_type == source_type,
                    FhirResourceRow.id.in_(
                        select(FhirIndexRow.row_id).where(
                            FhirIndexRow.resource_type == source_type,
                            FhirIndexRow.param == param,
                            FhirIndexRow.value.in_(refs),
                        )
                    ),
                )
                .order_by(FhirResourceRow.id)
            ).all()
        return [StoredResource(*r) for r in rows]

    def referenced(
        self, resource_type: str, resource_ids: Sequence[str], params: Sequence[str]
    ) -> list[StoredResource]:
        """The resources that these resources of ``resource_type`` reference through the
        reference search parameters ``params`` (index names): what ``_include`` adds."""
        if not resource_ids or not params:
            return []
        with self.db.transaction() as s:
            values = s.execute(
                select(FhirIndexRow.value)
                .join(FhirResourceRow, FhirResourceRow.id == FhirIndexRow.row_id)
                .where(
                    FhirResourceRow.resource_type == resource_type,
                    FhirResourceRow.resource_id.in_(list(resource_ids)),
                    FhirIndexRow.param.in_(list(params)),
                )
            ).scalars()
            targets = [v.partition("/") for v in values if "/" in v]
        return self.get_many((t, i) for t, _, i in targets)


@dataclass(frozen=True)
class SearchPage:
    """One page of a search: the total of matches, the page, and where the next starts."""

    total: int
    resources: list[StoredResource]
    next: Cursor | None  # None: this is the last page


@lru_cache(maxsize=512)
def _search_statements(
    resource_type: str, shapes: tuple[Shape, ...], sort: tuple[SortKey, ...], keyset: bool
) -> tuple[Select[Any], Select[Any]]:
    """(page, count) statements of a search of this shape, with bound parameters: ``rtype``,
    ``snapshot``, ``p0``... (the conditions' values, :func:`condition_parts` order), ``a0``...
    (``keyset``: the cursor's sort values, then its row), ``limit`` and ``offset``."""
    numbered: Iterator[BindParameter[Any]] = (bindparam(f"p{i}") for i in itertools.count())
    where = [
        FhirResourceRow.resource_type == bindparam("rtype"),
        FhirResourceRow.last_updated <= bindparam("snapshot", type_=DateTime()),
    ]
    where.extend(shaped_clause(resource_type, shape, lambda: next(numbered)) for shape in shapes)
    keys: list[tuple[ColumnElement[Any], bool]]
    keys = [(sort_column(resource_type, k), k.descending) for k in sort]
    keys.append((FhirResourceRow.id.expression, sort[-1].descending if sort else True))
    order = [c.desc() if d else c.asc() for c, d in keys]
    page = select(*_COLUMNS, *(c for c, _ in keys)).where(*where)
    if keyset:
        cursor = [bindparam(f"a{i}", type_=DateTime()) for i in range(len(keys) - 1)]
        page = page.where(after_clause(keys, [*cursor, bindparam(f"a{len(keys) - 1}")]))
    page = page.order_by(*order).limit(bindparam("limit")).offset(bindparam("offset"))
    # the total of a later page counts the whole snapshot, as the first page's did
    count = select(func.count()).select_from(FhirResourceRow).where(*where)
    return page, count


def _cursor_text(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _cursor_value(text: str | None) -> datetime:
    return datetime.fromisoformat(text) if text is not None else NO_DATE


def _index_row(row_id: int, rtype: str, v: IndexValue) -> dict[str, Any]:
    return {
        "row_id": row_id,
        "resource_type": rtype,
        "param": v.param,
        "system": v.system[:256],
        "value": v.value[:512],
        "date_start": v.start,
        "date_end": v.end,
    }


def _parse_iso(resource: Mapping[str, Any]) -> datetime:
    """meta.lastUpdated of a stored resource as naive UTC."""
    text = str((resource.get("meta") or {}).get("lastUpdated", ""))
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError:
        return utcnow()


__all__ = ["NO_HISTORY", "FhirStore", "SearchPage", "StoreWrite", "StoredResource", "new_id"]
