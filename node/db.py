"""Database plumbing shared by the ledger, the outbox and the FHIR store.

One SQLAlchemy ``Base`` for every table, one engine factory (SQLite gets WAL, full fsync
and a busy timeout; PostgreSQL a pre-ping pool), naive-UTC timestamps and one public
transaction helper. Nothing here knows about studies, deliveries or FHIR.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Column, Table, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from node.datadir import create_private_file

__all__ = [
    "Base",
    "Database",
    "ensure_columns",
    "insert_new",
    "make_engine",
    "process_owner",
    "table_of",
    "utcnow",
]


def utcnow() -> datetime:
    """Naive UTC (SQLite keeps no time zone; every timestamp in the database is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


def make_engine(url: str, pool_size: int = 0) -> Engine:
    """A SQLAlchemy engine; SQLite gets WAL, full fsync and a busy timeout.

    pool_size > 0 keeps that many connections (and as many overflow) for threaded servers.
    A new SQLite file is created 0600 first (its directory 0700): SQLite gives its WAL and
    SHM files the database file's mode.
    """
    pool: dict[str, int] = (
        {"pool_size": pool_size, "max_overflow": pool_size} if pool_size > 0 else {}
    )
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            create_private_file(Path(database))
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def process_owner() -> str:
    """``hostname:pid``: who holds a lease taken by this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_columns(engine: Engine, table: Table) -> list[str]:
    """Add the model's columns that an existing table lacks (a database made by an older version).

    Idempotent and safe when several processes start at once. Columns are added nullable
    (existing rows have no value), so a column added to a model must accept NULL. Returns the
    added names.
    """
    present = {c["name"] for c in inspect(engine).get_columns(table.name)}
    added: list[str] = []
    for column in table.columns:
        if column.name in present:
            continue
        with engine.begin() as conn:
            ddl = _add_column_ddl(engine, table, column)
            try:
                conn.execute(text(ddl))
            except (OperationalError, ProgrammingError) as exc:  # another process was first
                if "duplicate column" not in str(exc).lower():
                    raise
                continue
        added.append(column.name)
    return added


def _add_column_ddl(engine: Engine, table: Table, column: Column[Any]) -> str:
    preparer = engine.dialect.identifier_preparer
    kind = column.type.compile(dialect=engine.dialect)
    exists = " IF NOT EXISTS" if engine.dialect.name == "postgresql" else ""
    return (
        f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN{exists} "
        f"{preparer.format_column(column)} {kind}"
    )


def table_of(model: type[Base]) -> Table:
    """The table of a mapped class."""
    return cast(Table, model.__table__)


def insert_new(
    session: Session, model: type[Base], rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> int:
    """Insert rows, skipping any whose ``keys`` (a unique constraint) already exist.

    ``INSERT ... ON CONFLICT DO NOTHING``: no check-then-insert race between processes.
    Returns how many rows were inserted.
    """
    dialect = session.get_bind().dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    if dialect not in ("postgresql", "sqlite"):
        raise ValueError(f"insert_new supports SQLite and PostgreSQL, not {dialect}")
    table = table_of(model)
    added = 0
    for row in rows:
        stmt = (
            module.insert(table)
            .values(**row)
            .on_conflict_do_nothing(index_elements=keys)
            .returning(*table.primary_key.columns)
        )
        added += len(session.execute(stmt).all())  # a row comes back only when inserted
    return added


class Database:
    """An engine and its session factory; ``transaction()`` is one committed unit of work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._ready: set[str] = set()
        self._ready_lock = threading.Lock()

    def create_tables(self, models: Sequence[type[Base]]) -> None:
        """Create the models' missing tables and add missing columns (once per table here)."""
        with self._ready_lock:
            todo = [table_of(m) for m in models if table_of(m).name not in self._ready]
            if not todo:
                return
            Base.metadata.create_all(self.engine, tables=todo)
            for table in todo:
                ensure_columns(self.engine, table)
                self._ready.add(table.name)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed on normal exit and rolled back on error."""
        with self._sessions.begin() as session:
            yield session
