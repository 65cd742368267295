"""Subscription notifications (R4 rest-hook), delivered from the durable queue in the store.

A background thread in the API process takes due deliveries, claims each (its next attempt
moves past the request timeout, so a second API process does not send it too), and sends:

* empty payload: an empty ``POST`` to the endpoint (the RIS then reads or searches);
* ``application/fhir+json``: ``PUT [endpoint]/[type]/[id]`` with the resource.

The channel's headers go with every request. A 2xx is delivered; anything else is retried
with exponential backoff (``fhir.subscription_*``) and, after the last attempt, dead: the
Subscription goes to ``error`` with the reason, and ``medgemma-node status`` lists it.
Logs name the subscription, resource ids and the endpoint's host, never patient data.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select

from node.fhir.models import DeliveryState, SubscriptionDeliveryRow
from node.fhir.store import Delivery, FhirStore
from node.ledger import StudyLedger, utcnow
from node.settings import FhirSettings

log = logging.getLogger("medgemma.fhir.notify")


class DeliveryFailed(Exception):
    """One notification attempt failed; the message says how."""


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url[:40]


class SubscriptionNotifier:
    """Delivers due notifications every ``fhir.subscription_poll_seconds``."""

    def __init__(self, store: FhirStore, settings: FhirSettings) -> None:
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

    def _claim(self, limit: int = 20) -> list[Delivery]:
        """Due deliveries, each pushed past the request timeout so no one else takes it."""
        lease = timedelta(seconds=self.settings.subscription_timeout_seconds * 2 + 5)
        with self.store._tx() as s:
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
        return self.store.deliveries_by_id([r.id for r in rows])

    def deliver_due(self) -> int:
        """Send every due notification once; returns how many were delivered."""
        delivered = 0
        for d in self._claim():
            try:
                self._send(d)
            except DeliveryFailed as exc:
                self._failed(d, str(exc))
                continue
            self.store.mark_delivered(d.id)
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
        state = self.store.mark_failed(
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
    ledger: StudyLedger, limit: int = 10
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Notification counts by state and the latest dead ones (for ``medgemma-node status``)."""
    store = FhirStore(ledger)
    counts = store.delivery_counts()
    dead = []
    for d in store.deliveries(DeliveryState.DEAD, limit=limit):
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


__all__ = ["DeliveryFailed", "SubscriptionNotifier", "subscription_status"]
