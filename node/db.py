"""Database plumbing shared by the ledger, the outbox and the FHIR store.

One SQLAlchemy ``Base`` for every table, one engine factory (SQLite gets WAL, full fsync
and a busy timeout; PostgreSQL a pre-ping pool), naive-UTC timestamps and one public
transaction helper. Nothing here knows about studies, deliveries or FHIR.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

__all__ = ["Base", "Database", "make_engine", "utcnow"]


def utcnow() -> datetime:
    """Naive UTC (SQLite keeps no time zone; every timestamp in the database is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


def make_engine(url: str, pool_size: int = 0) -> Engine:
    """A SQLAlchemy engine; SQLite gets WAL, full fsync and a busy timeout.

    pool_size > 0 keeps that many connections (and as many overflow) for threaded servers.
    """
    pool: dict[str, int] = (
        {"pool_size": pool_size, "max_overflow": pool_size} if pool_size > 0 else {}
    )
    if url.startswith("sqlite"):
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


class Database:
    """An engine and its session factory; ``transaction()`` is one committed unit of work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed on normal exit and rolled back on error."""
        with self._sessions.begin() as session:
            yield session
