"""Log line formats: text (the default) and JSON (``--log-format json``, ``logging.format``).

A JSON line is one object: ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``message``,
``process``, ``thread``, and where there is one ``study_uid`` and ``request_id``. These
come from :func:`log_context` (the FHIR gateway sets the request id, a pre-read its
study), a record's ``extra``, or, for the study, the ``study <UID>`` the node's messages
name. Messages never carry patient names, IDs or birth dates (the node logs UIDs,
states and counts); an exception is one ``exception`` string, never extra lines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Final, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_study_uid: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "medgemma_study_uid", default=None
)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "medgemma_request_id", default=None
)
# "study 1.2.3", "(study 1.2.3 v2" ...: how the node's messages name a study
_STUDY_IN_MESSAGE: Final = re.compile(r"\bstudy (\d+(?:\.\d+)+)")


@contextmanager
def log_context(*, study_uid: str | None = None, request_id: str | None = None) -> Iterator[None]:
    """Records logged inside carry this study UID and/or request id (JSON format)."""
    tokens: list[tuple[contextvars.ContextVar[str | None], contextvars.Token[str | None]]] = []
    if study_uid is not None:
        tokens.append((_study_uid, _study_uid.set(study_uid)))
    if request_id is not None:
        tokens.append((_request_id, _request_id.set(request_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "process": record.process,
            "thread": record.threadName,
        }
        study = getattr(record, "study_uid", None) or _study_uid.get()
        if study is None:
            found = _STUDY_IN_MESSAGE.search(message)
            study = found.group(1) if found else None
        if study:
            entry["study_uid"] = study
        request_id = getattr(record, "request_id", None) or _request_id.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter of every handler of a node process."""
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
