"""The Celery app of the GPU workers (broker from the node settings).

Long GPU work follows the nothing-lost rules: a message is acknowledged only after the
task ends (acks_late), a worker takes one message at a time (prefetch 1), and a message
whose worker died is given back to the queue (reject on worker lost).

With ``queue.followup_affinity`` each worker also consumes its own direct queue
(``worker_direct``: ``<node name>.dq2``), where the node sends the follow-ups of the
studies whose image prefix it holds; its heartbeat, busy marks and held studies are
written by :mod:`workers.affinity` from the signals below.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from kombu import Queue

from node.settings import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    broker = settings.queue.broker_url or "redis://127.0.0.1:6379/0"
    app = Celery("medgemma-worker", broker=broker, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the ledger, not in a result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(settings.queue.preread_queue), Queue(settings.queue.followup_queue)],
        task_default_queue=settings.queue.preread_queue,
        task_routes={
            "medgemma.preread": {"queue": settings.queue.preread_queue},
            "medgemma.followup": {"queue": settings.queue.followup_queue},
        },
        task_soft_time_limit=settings.queue.task_soft_time_limit_seconds,
        task_time_limit=settings.queue.task_time_limit_seconds,
        broker_connection_retry_on_startup=True,
        # Redis: a message not acknowledged within this time is redelivered (> hard limit).
        broker_transport_options={
            "visibility_timeout": int(settings.queue.task_time_limit_seconds * 2)
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_direct=settings.queue.followup_affinity,
    )
    return app


app = make_celery(get_settings())


@worker_process_init.connect
def _load_engine(**_: Any) -> None:
    """Load and warm the engine once per pool process, before its first task."""
    from workers.preread import engine_for

    try:
        engine_for(get_settings().engine)
    except Exception:
        # the first task fails with the same error and records it on the study
        logging.getLogger("medgemma.worker").exception("engine could not be loaded")


if get_settings().queue.followup_affinity:
    _heartbeat: list[Any] = []

    @worker_init.connect
    def _name_worker(sender: Any = None, **_: Any) -> None:
        """The node name, before the pool forks: every pool process records it."""
        from workers.affinity import set_worker_name

        set_worker_name(str(getattr(sender, "hostname", "") or ""))

    @worker_ready.connect
    def _start_heartbeat(sender: Any = None, **_: Any) -> None:
        from workers.affinity import Heartbeat

        if sender is None:
            return
        queues = [q.name for q in sender.task_consumer.queues]
        beat = Heartbeat(get_settings(), str(sender.hostname), queues)
        beat.start()
        _heartbeat.append(beat)

    @worker_shutdown.connect
    def _stop_heartbeat(**_: Any) -> None:
        while _heartbeat:
            _heartbeat.pop().stop()

    @task_prerun.connect
    def _busy(**_: Any) -> None:
        from workers.affinity import task_started

        task_started(get_settings())

    @task_postrun.connect
    def _idle(**_: Any) -> None:
        from workers.affinity import task_ended

        task_ended(get_settings())


if get_settings().logging.format == "json":

    @setup_logging.connect
    def _json_logs(loglevel: object = None, **_: Any) -> None:
        """``--log-format json``: the worker writes the node's JSON lines (study UID and
        request id where known, never patient data) instead of Celery's text format."""
        from node.logfmt import make_formatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(make_formatter("json"))
        level = loglevel if isinstance(loglevel, int | str) and loglevel else "INFO"
        logging.basicConfig(level=level, handlers=[handler], force=True)
