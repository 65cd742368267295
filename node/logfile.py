"""The node's log file, failing soft: a full or broken log disk never stops the node.

``serve``/``scp``/``api`` log to stderr and to ``<data_dir>/logs/node.log`` (rotated). When
that file cannot be written (the disk holding it is full, it went read-only), the handler
records the failure *once* - the time and the reason - instead of printing a traceback for
every record, keeps trying (logging resumes by itself when space returns), and the node
keeps serving and logging to stderr.

``medgemma-node status`` runs in another process, so the state is shared through a small
JSON file in the data directory's root, ``<data_dir>/log-state.json``: not under ``logs/``,
which may be a separate mount (the one that is full). A file rather than the ledger, because
a logging handler must not write to the database (whose driver logs itself) and status
reads it even when the ledger is unreachable. If the data directory is full too, only
stderr says so (and the ledger is failing anyway).
"""

from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.datadir import open_private

#: The file, in the data directory's root, that says the log file is not writable.
LOG_STATE_FILE = "log-state.json"


@dataclass(frozen=True)
class LogFileProblem:
    """Since when (ISO 8601 UTC) and why the process ``pid`` cannot write ``path``."""

    path: str
    since: str
    reason: str
    pid: int

    @property
    def message(self) -> str:
        return f"log file not writable since {self.since}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def log_state_path(data_dir: Path) -> Path:
    return data_dir / LOG_STATE_FILE


def read_log_problem(data_dir: Path) -> LogFileProblem | None:
    """The recorded log file problem of a live node process, or None."""
    try:
        data = json.loads(log_state_path(data_dir).read_text(encoding="utf-8"))
        problem = LogFileProblem(
            str(data["path"]), str(data["since"]), str(data["reason"]), int(data["pid"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return problem if _alive(problem.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _describe(exc: BaseException | None) -> str:
    """``ENOSPC No space left on device`` for an OSError, ``Class: text`` otherwise."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name} {exc.strerror or os.strerror(exc.errno)}"
    if exc is None:
        return "unknown error"
    return f"{type(exc).__name__}: {exc}"


class FailSoftFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file handler that reports a write failure once, not once per record.

    On the first failed record it writes ``<data_dir>/log-state.json`` and one line to
    stderr; later failures are silent until a record is written again, which removes the
    file and says so on stderr. The file is opened on the first record (``delay``), so a
    log directory that cannot be opened is reported the same way.
    """

    def __init__(
        self, filename: Path, *, state_dir: Path, max_bytes: int, backup_count: int
    ) -> None:
        super().__init__(
            filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8", delay=True
        )
        self.state_file = log_state_path(state_dir)
        self.problem: LogFileProblem | None = None
        self._failed = False
        stale = read_log_problem(state_dir)
        if stale is None or stale.pid == os.getpid():
            self._clear_state()  # a dead process's record, or none

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)  # failures end in handleError, which sets _failed
        if self.problem is not None and not self._failed:
            print(
                f"medgemma-node: log file {self.baseFilename} is writable again "
                f"(it was not since {self.problem.since})",
                file=sys.stderr,
                flush=True,
            )
            self.problem = None
            self._clear_state()

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True
        # drop the unwritten bytes (the next record reopens the file): kept in the buffer, they
        # would fail every later write and then land half-written when space returns
        self._discard_stream()
        if self.problem is not None:
            return
        exc = sys.exc_info()[1]
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.problem = LogFileProblem(self.baseFilename, since, _describe(exc), os.getpid())
        print(
            f"medgemma-node: {self.problem.message}; logging to stderr only until it is",
            file=sys.stderr,
            flush=True,
        )
        try:
            tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}")
            with os.fdopen(open_private(tmp), "w", encoding="utf-8") as f:
                json.dump(asdict(self.problem), f)
            os.replace(tmp, self.state_file)
        except OSError:
            pass  # the data directory is full or read-only too: stderr has said it

    def _discard_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is None:
            return
        try:
            stream.close()
        except OSError:
            try:  # the buffer could not be flushed: close the descriptor anyway
                os.close(stream.fileno())
            except (OSError, ValueError):
                pass

    def _clear_state(self) -> None:
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # status shows a stale record until the next start: harmless
