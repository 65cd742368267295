"""Prometheus metrics of a node: ``/metrics`` on the FHIR API and on a listener of its own.

The node runs as several processes (``scp``, ``api``, Celery workers on other machines),
so nothing here is counted inside workers. What the ledger records is read from it at
each scrape instead, the same from any process that reaches the database: studies by
state and by pre-read stage, queue wait (queued -> running), pre-read, engine and
follow-up durations as histograms (from the ledger's timestamps), SR/SEG deliveries and
rest-hook notifications by state with their failed attempts. Only C-STORE outcomes are
counted in memory, in the process that runs the SCP (``serve``, or ``scp`` with
``metrics.port``). Engines report no token counts, so engine time is in seconds.

``metrics.token_sha256`` makes ``/metrics`` require ``Authorization: Bearer <token>``;
without it the metrics (counts and durations, no patient data) are served to anyone who
reaches the port, which should sit behind the network boundary.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.db import Database
from node.delivery import DeliveryState
from node.fhir.models import FollowupRow, FollowupState, SubscriptionDeliveryRow
from node.ledger import Study, StudyState
from node.outbox import OutboxRow
from node.settings import MetricsSettings

if TYPE_CHECKING:
    from node.scp import StoreCounters

log = logging.getLogger("medgemma.metrics")

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
QUEUE_WAIT_BUCKETS: Final = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
PREREAD_BUCKETS: Final = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)
FOLLOWUP_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class CountsStores(Protocol):
    """What counts C-STORE outcomes: a StorageSCP, or the receiving processes of
    ``dicom.receiver_processes`` > 1 (node.receivers.ReceiverPool, their shared counters)."""

    @property
    def counters(self) -> StoreCounters: ...


_scps: list[CountsStores] = []
_scps_lock = threading.Lock()


def track_scp(scp: CountsStores) -> None:
    """Count this process's SCP's C-STORE outcomes in its metrics."""
    with _scps_lock:
        if scp not in _scps:
            _scps.append(scp)


def untrack_scp(scp: CountsStores) -> None:
    with _scps_lock:
        if scp in _scps:
            _scps.remove(scp)


def histogram(
    values: Sequence[float], buckets: Sequence[float]
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative bucket counts (le, count) with +Inf, and the sum, of ``values``."""
    ordered = sorted(values)
    out: list[tuple[str, float]] = []
    i = 0
    for le in buckets:
        while i < len(ordered) and ordered[i] <= le:
            i += 1
        out.append((_le(le), float(i)))
    out.append(("+Inf", float(len(ordered))))
    return out, float(sum(ordered))


def _le(value: float) -> str:
    return f"{value:g}" if value != int(value) else f"{value:.1f}"


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


class LedgerCollector(Collector):
    """Metrics read from the ledger's database at each scrape."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        with self.db.transaction() as s:
            states = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
            stages = s.execute(
                select(Study.stage, func.count())
                .where(Study.state == StudyState.RUNNING.value, Study.stage.is_not(None))
                .group_by(Study.stage)
            ).all()
            purged = s.execute(
                select(func.count()).select_from(Study).where(Study.purged_at.is_not(None))
            ).scalar_one()
            runs = s.execute(
                select(
                    Study.state, Study.queued_at, Study.started_at, Study.finished_at,
                    Study.engine_seconds,
                ).where(Study.started_at.is_not(None))
            ).all()  # fmt: skip
            followups = s.execute(
                select(FollowupRow.state, FollowupRow.created_at, FollowupRow.finished_at).where(
                    FollowupRow.finished_at.is_not(None)
                )
            ).all()
            outbox = s.execute(
                select(OutboxRow.state, func.count(), func.sum(OutboxRow.attempts)).group_by(
                    OutboxRow.state
                )
            ).all()
            hooks = s.execute(
                select(
                    SubscriptionDeliveryRow.state,
                    func.count(),
                    func.sum(SubscriptionDeliveryRow.attempts),
                ).group_by(SubscriptionDeliveryRow.state)
            ).all()

        g = GaugeMetricFamily(
            "medgemma_studies", "Study versions in the ledger by state", labels=["state"]
        )
        for known in StudyState:
            g.add_metric([known.value], float(states.get(known.value, 0)))
        yield g
        g = GaugeMetricFamily(
            "medgemma_running_studies_by_stage",
            "Running pre-reads by their current stage",
            labels=["stage"],
        )
        for stage, n in stages:
            g.add_metric([str(stage)], float(n))
        yield g
        yield GaugeMetricFamily(
            "medgemma_studies_purged",
            "Study versions whose files spool retention removed",
            value=float(purged),
        )

        waits = [w for _, q, st, _, _ in runs if (w := _seconds(q, st)) is not None]
        yield self._histogram(
            "medgemma_queue_wait_seconds",
            "Time from queued to running (the latest run of each study version)",
            {"": waits},
            QUEUE_WAIT_BUCKETS,
        )
        by_outcome: dict[str, list[float]] = {"done": [], "failed": []}
        engine: list[float] = []
        for state, _, started, finished, engine_s in runs:
            d = _seconds(started, finished)
            if d is not None and state in by_outcome:
                by_outcome[state].append(d)
            if engine_s is not None:
                engine.append(float(engine_s))
        yield self._histogram(
            "medgemma_preread_seconds",
            "Pre-read duration (running to done or failed) by outcome",
            by_outcome,
            PREREAD_BUCKETS,
            label="outcome",
        )
        yield self._histogram(
            "medgemma_engine_seconds",
            "Engine time of each pre-read (engines report no token counts)",
            {"": engine},
            PREREAD_BUCKETS,
        )
        answers: dict[str, list[float]] = {
            FollowupState.ANSWERED.value: [],
            FollowupState.FAILED.value: [],
        }
        for state, created, finished in followups:
            d = _seconds(created, finished)
            if d is not None and state in answers:
                answers[state].append(d)
        yield self._histogram(
            "medgemma_followup_seconds",
            "Follow-up question duration (asked to answered or failed) by outcome",
            answers,
            FOLLOWUP_BUCKETS,
            label="outcome",
        )
        yield from _deliveries("medgemma_outbox", "SR/SEG deliveries to destinations", outbox)
        yield from _deliveries(
            "medgemma_notifications", "FHIR Subscription rest-hook notifications", hooks
        )

    @staticmethod
    def _histogram(
        name: str,
        doc: str,
        series: dict[str, list[float]],
        buckets: Sequence[float],
        label: str = "",
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label] if label else None)
        for value, values in series.items():
            counts, total = histogram(values, buckets)
            family.add_metric([value] if label else [], counts, total)
        return family


def _deliveries(
    prefix: str, what: str, rows: Iterable[tuple[str, int, int | None]]
) -> Iterator[Metric]:
    """``<prefix>_deliveries{state}`` and ``<prefix>_failed_attempts`` (attempts that did not
    deliver; an operator's replay resets a row's count)."""
    by_state = {str(state): (int(n), int(attempts or 0)) for state, n, attempts in rows}
    g = GaugeMetricFamily(f"{prefix}_deliveries", f"{what} by state", labels=["state"])
    for state in DeliveryState:
        g.add_metric([state.value], float(by_state.get(state.value, (0, 0))[0]))
    yield g
    delivered = by_state.get(DeliveryState.DELIVERED.value, (0, 0))[0]
    failed = sum(a for _, a in by_state.values()) - delivered
    yield GaugeMetricFamily(
        f"{prefix}_failed_attempts",
        f'{what}: failed attempts recorded (dead letters: {prefix}_deliveries{{state="dead"}})',
        value=float(max(failed, 0)),
    )


class ScpCollector(Collector):
    """C-STORE outcomes of the SCPs running in this process."""

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "medgemma_cstore_instances",
            "C-STORE requests answered by this process's SCP, by outcome "
            "(stored: Success and kept; duplicate: Success, identical instance already "
            "kept; refused: a failure status)",
            labels=["outcome"],
        )
        with _scps_lock:
            scps = list(_scps)
        counts = {"stored": 0, "duplicate": 0, "refused": 0}
        for scp in scps:
            counts["stored"] += scp.counters.stored
            counts["duplicate"] += scp.counters.duplicates
            counts["refused"] += scp.counters.refused
        for outcome, n in counts.items():
            c.add_metric([outcome], float(n))
        yield c


def render_metrics(db: Database) -> bytes:
    """The Prometheus text exposition of this node's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(db))
    registry.register(ScpCollector())
    return generate_latest(registry)


def token_allows(settings: MetricsSettings, authorization: str | None) -> bool:
    """Whether a request's Authorization header may read /metrics."""
    if not settings.token_sha256:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    return hmac.compare_digest(digest, settings.token_sha256)


class MetricsServer:
    """``GET /metrics`` on ``metrics.bind_address``:``metrics.port`` (a thread)."""

    def __init__(self, settings: MetricsSettings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        db, settings = self.db, self.settings

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self._send(404, b"only /metrics is served here\n", "text/plain")
                elif not token_allows(settings, self.headers.get("Authorization")):
                    self._send(401, b"a bearer token is required (metrics.token_sha256)\n",
                               "text/plain", {"WWW-Authenticate": "Bearer"})  # fmt: skip
                else:
                    self._send(200, render_metrics(db), CONTENT_TYPE)

            def _send(
                self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per scrape would drown the node's log

        self._server = ThreadingHTTPServer((settings.bind_address, settings.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="medgemma-metrics", daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
        return str(host), int(port)

    @property
    def port(self) -> int:
        assert self._server is not None, "MetricsServer.start() first"
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
