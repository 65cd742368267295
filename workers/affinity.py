"""The worker's side of follow-up routing (:mod:`node.affinity`).

With ``queue.followup_affinity`` a Celery worker consumes its own direct queue
(``worker_direct``), beats in the node's database from its main process (the queues it
consumes), marks itself busy while a task runs, and after each task records which studies'
image prefixes its engine now holds in this process (and forgets the ones evicted), so
that the node sends their follow-ups here. ``workers.celery_app`` connects these to
Celery's signals.

Routing is an optimisation: every failure here is logged and swallowed, and the node falls
back to the shared queue on its own (a missing heartbeat, a question not started in time).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import lru_cache

from node.affinity import WorkerRegistry
from node.db import make_engine
from node.ledger import StudyLedger
from node.settings import Settings
from workers.engines.base import held_studies
from workers.preread import engine_for, ledger_for

log = logging.getLogger("medgemma.affinity")

_worker_name = ""  # the Celery node name: set in the main process, inherited by pool children
_noted: set[str] = set()  # studies this process has recorded as held


def set_worker_name(name: str) -> None:
    """Name this process's worker (``worker_init``, before the pool forks)."""
    global _worker_name
    _worker_name = name


def worker_name() -> str:
    return _worker_name


@lru_cache(maxsize=4)
def _registry(ledger: StudyLedger, heartbeat: float, busy_limit: float) -> WorkerRegistry:
    return WorkerRegistry(ledger.engine, heartbeat, busy_limit)


def registry_for(settings: Settings) -> WorkerRegistry:
    """The process-wide registry on the node's database."""
    queue = settings.queue
    return _registry(
        ledger_for(settings), queue.worker_heartbeat_seconds, queue.task_time_limit_seconds
    )


class Heartbeat:
    """Beats every ``queue.worker_heartbeat_seconds`` from a daemon thread of the worker's
    main process; ``stop`` removes the worker at once (a clean shutdown).

    It opens its own database engine rather than the process-wide ledger's: pool processes
    that Celery forks later (a replaced child) must not inherit the connections this
    thread uses."""

    def __init__(self, settings: Settings, name: str, queues: Sequence[str]) -> None:
        queue = settings.queue
        self.registry = WorkerRegistry(
            make_engine(settings.storage.resolved_database_url()),
            queue.worker_heartbeat_seconds,
            queue.task_time_limit_seconds,
        )
        self.name = name
        self.queues = tuple(queues)
        self.interval = settings.queue.worker_heartbeat_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medgemma-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def _beat(self) -> None:
        try:
            self.registry.beat(self.name, self.queues)
        except Exception as exc:  # the database is away: the next beat tries again
            log.warning("worker %s: heartbeat not written: %s", self.name, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.registry.leave(self.name)
        except Exception as exc:
            log.warning("worker %s: could not record that it stops: %s", self.name, exc)


def task_started(settings: Settings) -> None:
    """A task starts in this process: the worker is busy (follow-ups go elsewhere)."""
    if not _worker_name:
        return
    try:
        registry_for(settings).set_busy(_worker_name, True)
    except Exception as exc:
        log.warning("worker %s: busy mark not written: %s", _worker_name, exc)


def task_ended(settings: Settings) -> None:
    """A task ended: the worker is idle, and holds the prefixes its engine now keeps."""
    if not _worker_name:
        return
    try:
        registry = registry_for(settings)
        registry.set_busy(_worker_name, False)
        sync_held_studies(registry, _worker_name, held_studies(engine_for(settings.engine)))
    except Exception as exc:
        log.warning("worker %s: idle mark or held studies not written: %s", _worker_name, exc)


def sync_held_studies(registry: WorkerRegistry, name: str, held: Sequence[str]) -> None:
    """Record the studies newly held by this process and forget the evicted ones."""
    now = set(held)
    for study_uid in now - _noted:
        registry.note_study(study_uid, name)
    for study_uid in _noted - now:
        registry.forget_study(study_uid, name)
    _noted.clear()
    _noted.update(now)
