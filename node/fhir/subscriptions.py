"""Subscription notifications (R4 rest-hook): queued with each write, sent by a notifier.

Queueing: every write of a DiagnosticReport or Communication calls
:func:`queue_notifications` in the write's own transaction (the store does), which adds a
durable delivery row for each active Subscription whose criteria the new version matches,
so a notification is never lost between the write and the sender.

Sending: a background thread in the API process (:class:`SubscriptionNotifier`) takes due
deliveries, claims each (its next attempt moves past the request timeout, so a second API
process does not send it too), and sends:

* empty payload: an empty ``POST`` to the endpoint (the RIS then reads or searches);
* ``application/fhir+json``: ``PUT [endpoint]/[type]/[id]`` with the resource.

The channel's headers go with every request. A 2xx is delivered; anything else is retried
with exponential backoff (``fhir.subscription_*``) and, after the last attempt, dead: the
Subscription goes to ``error`` with the reason, and ``medgemma-node status`` lists it.
Logs name the subscription, resource ids and the endpoint's host, never patient data.

This module does not import the store (the store imports it to queue notifications): the
notifier reads and updates Subscriptions through :class:`SubscriptionResources`, which
:class:`node.fhir.store.FhirStore` satisfies.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Protocol

import httpx
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from node.db import Database, utcnow
from node.fhir.errors import FhirError, bad_request
from node.fhir.models import (
    DeliveryState,
    FhirIndexRow,
    FhirResourceRow,
    SubscriptionDeliveryRow,
)
from node.fhir.search import Condition, parse_query
from node.fhir.search_sql import condition_clause
from node.outbox import record_failed_attempt
from node.settings import FhirSettings

log = logging.getLogger("medgemma.fhir.notify")

#: Resource types whose writes are matched against Subscription criteria.
SUBSCRIBABLE: Final = ("DiagnosticReport", "Communication")


def parse_criteria(criteria: str) -> tuple[str, list[Condition]]:
    """``Type?param=value&...`` -> (Type, conditions); FhirError for anything unsupported."""
    rtype, _, query = criteria.strip().partition("?")
    if rtype not in SUBSCRIBABLE:
        raise bad_request(
            f"Subscription.criteria must start with one of {', '.join(SUBSCRIBABLE)}, not {rtype!r}"
        )
    items = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return rtype, parse_query(rtype, items)


@dataclass(frozen=True)
class Delivery:
    """One pending (or dead) Subscription notification."""

    id: int
    subscription_id: str
    resource_type: str
    resource_id: str
    version_id: int
    state: DeliveryState
    attempts: int
    last_error: str

    @classmethod
    def of(cls, r: SubscriptionDeliveryRow) -> Delivery:
        return cls(
            r.id,
            r.subscription_id,
            r.resource_type,
            r.resource_id,
            r.version_id,
            DeliveryState(r.state),
            r.attempts,
            r.last_error,
        )


# --------------------------------------------------------------------------- queueing


def queue_notifications(
    session: Session, row_id: int, resource_type: str, resource_id: str, version: int
) -> None:
    """In the transaction that wrote version ``version`` of a resource (stored as row
    ``row_id``, its search index already written): one delivery for every active
    Subscription whose criteria that version matches. Other resource types are ignored."""
    if resource_type not in SUBSCRIBABLE:
        return
    subs = session.execute(
        select(FhirResourceRow.resource_id, FhirResourceRow.body).where(
            FhirResourceRow.resource_type == "Subscription",
            FhirResourceRow.id.in_(
                select(FhirIndexRow.row_id).where(
                    FhirIndexRow.resource_type == "Subscription",
                    FhirIndexRow.param == "status",
                    FhirIndexRow.value == "active",
                )
            ),
        )
    ).all()
    for sub_id, sub_body in subs:
        criteria = str(json.loads(sub_body).get("criteria", ""))
        try:
            ctype, conditions = parse_criteria(criteria)
        except FhirError:
            continue  # refused at creation; an old row with bad criteria matches nothing
        if ctype != resource_type:
            continue
        hit = session.execute(
            select(FhirResourceRow.id).where(
                FhirResourceRow.id == row_id,
                *(condition_clause(ctype, c) for c in conditions),
            )
        ).first()
        if hit is None:
            continue
        session.add(
            SubscriptionDeliveryRow(
                subscription_id=sub_id,
                resource_type=resource_type,
                resource_id=resource_id,
                version_id=version,
                state=DeliveryState.PENDING.value,
                next_attempt_at=utcnow(),
            )
        )
        log.info(
            "notification queued: Subscription/%s <- %s/%s/_history/%d",
            sub_id,
            resource_type,
            resource_id,
            version,
        )


def drop_pending(session: Session, subscription_id: str) -> None:
    """In the transaction that deletes a Subscription: its pending deliveries go too."""
    session.execute(
        delete(SubscriptionDeliveryRow).where(
            SubscriptionDeliveryRow.subscription_id == subscription_id,
            SubscriptionDeliveryRow.state == DeliveryState.PENDING.value,
        )
    )


# --------------------------------------------------------------------------- bookkeeping


def mark_delivered(db: Database, delivery_id: int) -> None:
    with db.transaction() as s:
        row = s.get(SubscriptionDeliveryRow, delivery_id)
        if row is not None:
            row.state = DeliveryState.DELIVERED.value
            row.attempts += 1
            row.last_error = ""
            row.delivered_at = utcnow()


def mark_failed(
    db: Database, delivery_id: int, error: str, *, max_attempts: int, base: float, cap: float
) -> DeliveryState:
    """Count a failed attempt: retry with exponential backoff, or dead-letter it."""
    with db.transaction() as s:
        row = s.get(SubscriptionDeliveryRow, delivery_id)
        if row is None:
            return DeliveryState.DEAD
        return record_failed_attempt(row, error, max_attempts=max_attempts, base=base, cap=cap)


def deliveries(
    db: Database, state: DeliveryState | None = None, limit: int = 100
) -> list[Delivery]:
    """The latest deliveries (in ``state``), newest first."""
    with db.transaction() as s:
        q = select(SubscriptionDeliveryRow)
        if state is not None:
            q = q.where(SubscriptionDeliveryRow.state == state.value)
        rows = s.execute(q.order_by(SubscriptionDeliveryRow.id.desc()).limit(limit)).scalars()
        return [Delivery.of(r) for r in rows]


def delivery_counts(db: Database) -> dict[str, int]:
    """Deliveries by state (every state, 0 when none)."""
    with db.transaction() as s:
        rows = s.execute(
            select(SubscriptionDeliveryRow.state, func.count()).group_by(
                SubscriptionDeliveryRow.state
            )
        ).all()
    counts = {d.value: 0 for d in DeliveryState}
    counts.update({str(state): int(n) for state, n in rows})
    return counts


def _claim(db: Database, lease_seconds: float, limit: int) -> list[Delivery]:
    """Due deliveries, each pushed ``lease_seconds`` ahead so no one else takes it."""
    lease = timedelta(seconds=lease_seconds)
    with db.transaction() as s:
        rows = list(
            s.execute(
                select(SubscriptionDeliveryRow)
                .where(
                    SubscriptionDeliveryRow.state == DeliveryState.PENDING.value,
                    SubscriptionDeliveryRow.next_attempt_at <= utcnow(),
                )
                .order_by(SubscriptionDeliveryRow.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        for row in rows:
            row.next_attempt_at = utcnow() + lease
        return [Delivery.of(r) for r in rows]


# --------------------------------------------------------------------------- sending


class StoredBody(Protocol):
    """A stored resource as the notifier reads it."""

    @property
    def body(self) -> str: ...

    @property
    def resource(self) -> dict[str, Any]: ...


class SubscriptionResources(Protocol):
    """What the notifier needs of the FHIR store: its database, reads and one write."""

    @property
    def db(self) -> Database: ...

    def get(self, resource_type: str, resource_id: str) -> StoredBody | None: ...

    def put(self, resource: Mapping[str, Any]) -> object: ...


class DeliveryFailed(Exception):
    """One notification attempt failed; the message says how."""


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url[:40]


class SubscriptionNotifier:
    """Delivers due notifications every ``fhir.subscription_poll_seconds``."""

    def __init__(self, store: SubscriptionResources, settings: FhirSettings) -> None:
        self.store = store
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a fresh connection per notification: endpoints that close idle connections
        # would otherwise turn a retry into a connection reset
        self._client = httpx.Client(
            timeout=settings.subscription_timeout_seconds,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fhir-notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.subscription_timeout_seconds + 5)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:
                log.exception("subscription notifier round failed")
            self._stop.wait(self.settings.subscription_poll_seconds)

    def deliver_due(self) -> int:
        """Send every due notification once; returns how many were delivered."""
        delivered = 0
        lease = self.settings.subscription_timeout_seconds * 2 + 5
        for d in _claim(self.store.db, lease, limit=20):
            try:
                self._send(d)
            except DeliveryFailed as exc:
                self._failed(d, str(exc))
                continue
            mark_delivered(self.store.db, d.id)
            delivered += 1
            log.info(
                "notified Subscription/%s of %s/%s v%d",
                d.subscription_id,
                d.resource_type,
                d.resource_id,
                d.version_id,
            )
        return delivered

    def _send(self, d: Delivery) -> None:
        sub = self.store.get("Subscription", d.subscription_id)
        if sub is None:
            raise DeliveryFailed("the Subscription was deleted")
        data = sub.resource
        if data.get("status") != "active":
            raise DeliveryFailed(f"the Subscription is {data.get('status')}")
        channel: dict[str, Any] = data.get("channel") or {}
        endpoint = str(channel.get("endpoint", ""))
        headers = {}
        for line in channel.get("header", []):
            name, _, value = str(line).partition(":")
            headers[name.strip()] = value.strip()
        payload = str(channel.get("payload") or "")
        try:
            if payload:
                resource = self.store.get(d.resource_type, d.resource_id)
                if resource is None:
                    raise DeliveryFailed(f"{d.resource_type}/{d.resource_id} no longer exists")
                url = f"{endpoint.rstrip('/')}/{d.resource_type}/{d.resource_id}"
                headers["Content-Type"] = payload
                response = self._client.put(url, content=resource.body.encode(), headers=headers)
            else:
                response = self._client.post(endpoint, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{_host(endpoint)}: {type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"{_host(endpoint)} answered HTTP {response.status_code}")

    def _failed(self, d: Delivery, error: str) -> None:
        s = self.settings
        state = mark_failed(
            self.store.db,
            d.id,
            error,
            max_attempts=s.subscription_max_attempts,
            base=s.subscription_backoff_base_seconds,
            cap=s.subscription_backoff_max_seconds,
        )
        if state is DeliveryState.DEAD:
            log.error(
                "notification of Subscription/%s about %s/%s is dead after %d attempts: %s",
                d.subscription_id,
                d.resource_type,
                d.resource_id,
                d.attempts + 1,
                error,
            )
            self._subscription_error(d.subscription_id, error)
        else:
            log.warning(
                "notification of Subscription/%s failed (attempt %d), will retry: %s",
                d.subscription_id,
                d.attempts + 1,
                error,
            )

    def _subscription_error(self, subscription_id: str, error: str) -> None:
        sub = self.store.get("Subscription", subscription_id)
        if sub is None:
            return
        data = dict(sub.resource)
        data.update(status="error", error=f"notifications failed: {error}"[:500])
        self.store.put(data)


def subscription_status(
    store: SubscriptionResources, limit: int = 10
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Notification counts by state and the latest dead ones (for ``medgemma-node status``)."""
    counts = delivery_counts(store.db)
    dead = []
    for d in deliveries(store.db, DeliveryState.DEAD, limit=limit):
        sub = store.get("Subscription", d.subscription_id)
        endpoint = ""
        if sub is not None:
            endpoint = _host(str((sub.resource.get("channel") or {}).get("endpoint", "")))
        dead.append(
            {
                "subscription": d.subscription_id,
                "resource": f"{d.resource_type}/{d.resource_id}",
                "endpoint": endpoint,
                "attempts": d.attempts,
                "last_error": d.last_error,
            }
        )
    return counts, dead


__all__ = [
    "SUBSCRIBABLE",
    "Delivery",
    "DeliveryFailed",
    "StoredBody",
    "SubscriptionNotifier",
    "SubscriptionResources",
    "deliveries",
    "delivery_counts",
    "drop_pending",
    "mark_delivered",
    "mark_failed",
    "parse_criteria",
    "queue_notifications",
    "subscription_status",
]
