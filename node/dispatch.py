"""Sending work to workers by task name: Celery over Redis, or an in-process worker for ``serve``.

The node never imports worker code statically: production sends tasks by name through the
broker; ``serve`` loads the worker entry point by its dotted name at start (``importlib``),
so the node installs and runs without torch.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("medgemma.dispatch")

PREREAD_TASK = "medgemma.preread"
FOLLOWUP_TASK = "medgemma.followup"
# The plain functions behind the tasks, loaded by name for the in-process worker.
INPROCESS_PREREAD = "workers.preread:run_preread_by_uid"
INPROCESS_FOLLOWUP = "workers.followup:run_followup_by_id"

_TASK_NAMESPACE = uuid.UUID("6f1c1d2e-8b7a-4c59-9f0e-6d2a4b8c9e10")


def preread_task_id(study_uid: str, version: int) -> str:
    """The Celery task id of a study version's pre-read: the same every time it is sent."""
    return str(uuid.uuid5(_TASK_NAMESPACE, f"preread/{study_uid}/{version}"))


def followup_task_id(question_id: str) -> str:
    """The Celery task id of a follow-up question: the same every time it is sent."""
    return str(uuid.uuid5(_TASK_NAMESPACE, f"followup/{question_id}"))


class DispatchError(Exception):
    """The task could not be handed to the broker; the study stays queued for the reconciler.

    ``cause`` is the underlying error in one short line (its class and text), for the study's
    reason; the message adds the broker's address (without a password) for the log.
    """

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause or message


def error_summary(exc: BaseException, limit: int = 160) -> str:
    """``Class: first line of the text`` of an error, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    summary = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


class Dispatcher(Protocol):
    def send_preread(self, study_uid: str, version: int) -> str: ...

    def send_followup(self, question_id: str, route: str = "") -> str: ...

    def queue_depth(self) -> int | None: ...

    def close(self) -> None: ...


class CeleryDispatcher:
    """Sends tasks by name to a Celery broker (Redis); needs no worker code."""

    def __init__(
        self, broker_url: str, preread_queue: str = "preread", followup_queue: str = "followup"
    ) -> None:
        from celery import Celery

        self.broker_url = broker_url
        self.preread_queue = preread_queue
        self.followup_queue = followup_queue
        self.app = Celery("medgemma-node", broker=broker_url)
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
            broker_transport_options={"max_retries": 2, "interval_start": 0.2},
        )

    def send_preread(self, study_uid: str, version: int) -> str:
        task_id = preread_task_id(study_uid, version)
        self._send(PREREAD_TASK, [study_uid, version], task_id, self.preread_queue)
        return task_id

    def send_followup(self, question_id: str, route: str = "") -> str:
        """Queue a follow-up question (its id) on the follow-up queue, or with ``route`` (a
        worker's Celery node name) on that worker's direct queue (``worker_direct``); the
        route travels in the message so that the worker can tell a stale one."""
        task_id = followup_task_id(question_id)
        if route:
            from celery.utils.nodenames import worker_direct

            self._send(FOLLOWUP_TASK, [question_id, route], task_id, worker_direct(route))
        else:
            self._send(FOLLOWUP_TASK, [question_id], task_id, self.followup_queue)
        return task_id

    def _send(self, task: str, args: list[object], task_id: str, queue: object) -> None:
        """Hand one task to the broker by name, with a short bounded retry."""
        try:
            self.app.send_task(
                task,
                args=args,
                task_id=task_id,
                queue=queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:
            raise DispatchError(
                f"broker {self._safe_url()} unavailable: {exc}", error_summary(exc)
            ) from exc

    def queue_depth(self) -> int | None:
        try:
            with self.app.connection_for_write() as conn:
                client = conn.channel().client
                return int(client.llen(self.preread_queue))
        except Exception:
            return None

    def _safe_url(self) -> str:
        # never print a password from the URL
        head, _, tail = self.broker_url.rpartition("@")
        return f"{self.broker_url.split('://')[0]}://***@{tail}" if head else self.broker_url

    def close(self) -> None:
        self.app.close()


class InProcessDispatcher:
    """Background threads that run the work in this process (``serve``): one for pre-reads
    and, with a follow-up handler, one for follow-up questions (short work is not queued
    behind long pre-reads)."""

    def __init__(
        self,
        handler: Callable[[str, int], object],
        followup_handler: Callable[[str], object] | None = None,
    ) -> None:
        self._handler = handler
        self._queue: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="medgemma-worker", daemon=True)
        self._thread.start()
        self._followup_handler = followup_handler
        self._followups: queue.Queue[str | None] = queue.Queue()
        self._followup_thread: threading.Thread | None = None
        if followup_handler is not None:
            self._followup_thread = threading.Thread(
                target=self._run_followups, name="medgemma-followup", daemon=True
            )
            self._followup_thread.start()

    @classmethod
    def from_entry_point(
        cls, entry_point: str, settings: object, followup_entry_point: str | None = None
    ) -> InProcessDispatcher:
        """Load the factories ``module:function`` by name; each returns a handler for settings."""

        def load(name: str) -> Callable[..., object]:
            module_name, _, attr = name.partition(":")
            factory = getattr(importlib.import_module(module_name), attr)
            handler: Callable[..., object] = factory(settings)
            return handler

        followup = load(followup_entry_point) if followup_entry_point else None
        return cls(load(entry_point), followup)

    def send_preread(self, study_uid: str, version: int) -> str:
        self._queue.put((study_uid, version))
        return preread_task_id(study_uid, version)

    def send_followup(self, question_id: str, route: str = "") -> str:
        """One process: every follow-up runs here (``route`` needs no queue of its own)."""
        if self._followup_handler is None:
            raise DispatchError("this process has no follow-up worker")
        self._followups.put(question_id)
        return followup_task_id(question_id)

    def queue_depth(self) -> int | None:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            study_uid, version = item
            try:
                self._handler(study_uid, version)
            except Exception:
                log.exception("in-process pre-read of study %s v%d failed", study_uid, version)

    def _run_followups(self) -> None:
        assert self._followup_handler is not None
        while True:
            question_id = self._followups.get()
            if question_id is None:
                return
            try:
                self._followup_handler(question_id)
            except Exception:
                log.exception("in-process follow-up %s failed", question_id)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._followup_thread is not None:
            self._followups.put(None)
            self._followup_thread.join(timeout=30)
