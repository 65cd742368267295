"""Wiring of one node process: spool, ledger, SCP, dispatcher and coordinator."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from node.completion import StudyCoordinator
from node.datadir import private_dirs
from node.dispatch import (
    INPROCESS_FOLLOWUP,
    INPROCESS_PREREAD,
    CeleryDispatcher,
    Dispatcher,
    InProcessDispatcher,
)
from node.ledger import StudyLedger
from node.metrics import MetricsServer, track_scp, untrack_scp
from node.outbox import Outbox, OutboxSender
from node.receivers import ReceiverPool
from node.retention import SpoolRetention
from node.scp import StorageSCP
from node.settings import Settings
from node.spool import Spool

if TYPE_CHECKING:
    from node.fhir.server import ApiServer

log = logging.getLogger("medgemma.node")


def make_dispatcher(settings: Settings, *, embedded: bool) -> Dispatcher:
    """Celery when a broker is configured; the in-process worker for ``serve`` without one."""
    if settings.queue.broker_url:
        return CeleryDispatcher(
            settings.queue.broker_url, settings.queue.preread_queue, settings.queue.followup_queue
        )
    if not embedded:
        raise ValueError(
            "queue.broker_url is empty: set it (e.g. MEDGEMMA_NODE_QUEUE__BROKER_URL="
            "redis://127.0.0.1:6379/0) or run `medgemma-node serve` for the embedded worker"
        )
    return InProcessDispatcher.from_entry_point(INPROCESS_PREREAD, settings, INPROCESS_FOLLOWUP)


class NodeRuntime:
    """The SCP side of a node: what `scp` and `serve` run (``api=True``: the FHIR API too)."""

    def __init__(self, settings: Settings, *, embedded: bool, api: bool = False) -> None:
        self.settings = settings
        data = settings.storage.data_path
        private_dirs(data)  # patient data: 0700
        self.spool = Spool(
            settings.storage.spool_path,
            settings.storage.min_free_mb * 2**20,
            receive_dir=settings.storage.receive_path,
        )
        removed = self.spool.remove_orphan_parts()
        if removed:
            log.warning("removed %d partial files left by an interrupted write", removed)
        leftovers = self.spool.remove_leftovers()
        if leftovers.files:
            log.warning(
                "removed %d partial received datasets (%.1f MiB) left in %s by interrupted "
                "transfers (a sender or this node stopped during a C-STORE)",
                leftovers.files,
                leftovers.size_bytes / 2**20,
                self.spool.receive_dir,
            )
        self.ledger = StudyLedger(
            settings.storage.resolved_database_url(),
            run_lease_seconds=settings.queue.run_lease_seconds,
            max_run_seconds=settings.queue.task_time_limit_seconds,
        )
        self.dispatcher = make_dispatcher(settings, embedded=embedded)
        self.coordinator = StudyCoordinator(settings, self.ledger, self.dispatcher)
        self.scp = StorageSCP(
            settings.dicom, self.spool, self.ledger, on_release=self.coordinator.complete_on_release
        )
        # dicom.receiver_processes > 1: this process listens and hands each connection to
        # one of several receiving processes (node.receivers); self.scp is not started then
        self.receivers: ReceiverPool | None = None
        if settings.dicom.receiving_processes > 1:
            self.receivers = ReceiverPool(settings, on_release=self.coordinator.complete_on_release)
        self._counted = self.receivers if self.receivers is not None else self.scp
        # a released study completes before its grace time ends once its sender's host has
        # no connection open (node.completion): the node's accepted connections, per host
        self.coordinator.host_connections = self._counted.host_connections
        track_scp(self._counted)  # C-STORE outcomes in this process's /metrics
        self.outbox = Outbox(self.ledger, settings.outbox)
        self.sender = OutboxSender(
            self.outbox,
            settings.destinations,
            settings.dicom.ae_title,
            broker_url=settings.queue.broker_url,  # workers elsewhere wake it through Redis
        )
        self.retention = SpoolRetention(settings, self.ledger)
        # the node's own /metrics listener (metrics.port; 0 = off): scp has no FHIR API
        self.metrics: MetricsServer | None = None
        if settings.metrics.port:
            self.metrics = MetricsServer(settings.metrics, self.ledger.db)
        self.api: ApiServer | None = None
        if api:
            from node.fhir.server import ApiServer

            self.api = ApiServer(settings, dispatcher=self.dispatcher)

    @property
    def dicom_port(self) -> int:
        """The port the node's DICOM SCP listens on (once started)."""
        return self.receivers.port if self.receivers is not None else self.scp.port

    def start(self) -> tuple[str, int]:
        address = self.receivers.start() if self.receivers is not None else self.scp.start()
        # serve: the in-process worker of a process that just started runs nothing yet, so
        # what a previous process of this node left queued or running is re-sent at once
        self.coordinator.start(recover_runs=isinstance(self.dispatcher, InProcessDispatcher))
        self.sender.start(self.settings.outbox.poll_seconds)
        self.retention.start()
        if self.metrics is not None:
            self.metrics.start()
        return address

    def start_api(self) -> tuple[str, int]:
        """Start the FHIR API (``serve``); OSError when its port cannot be bound."""
        assert self.api is not None, "NodeRuntime(api=True) serves the FHIR API"
        return self.api.start()

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.receivers is not None:
            self.receivers.stop()
        self.scp.stop()
        untrack_scp(self._counted)
        self.retention.stop()
        self.sender.stop()
        self.coordinator.stop()
        self.dispatcher.close()
        self.ledger.close()
