"""Subscription notifications (R4 rest-hook): queued with each write, sent by a notifier.

Queueing: every write of a DiagnosticReport or Communication calls
:func:`queue_notifications` in the write's own transaction (the store does), which adds a
durable delivery row for each active Subscription whose criteria the new version matches,
so a notification is never lost between the write and the sender.

Sending: a background thread in the API process (:class:`SubscriptionNotifier`) leases due
deliveries (:func:`node.delivery.claim_due`: two API processes never send the same one; a
lease whose holder died runs out and another takes the delivery), and sends:

* empty payload: an empty ``POST`` to the endpoint (the RIS then reads or searches);
* ``application/fhir+json``: ``PUT [endpoint]/[type]/[id]`` with the resource.

Before each request the endpoint is checked again (allow-list, https, the addresses its host
resolves to now: :func:`node.fhir.channel.check_endpoint`) and the request goes to the
address that was checked. The channel's headers (stored encrypted) go with every request,
decrypted with the node's key file. A 2xx is delivered; anything else is retried
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
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from node import delivery
from node.db import Database, process_owner, utcnow
from node.delivery import DeliveryState
from node.fhir.channel import (
    ChannelKeyError,
    EndpointRefused,
    HeaderCipher,
    Resolver,
    check_endpoint,
    resolve_host,
)
from node.fhir.errors import FhirError, bad_request
from node.fhir.models import FhirIndexRow, FhirResourceRow, SubscriptionDeliveryRow
from node.fhir.search import Condition, parse_query
from node.fhir.search_sql import condition_clause
from node.settings import FhirSettings, Settings

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


#: The active Subscriptions (built once: this runs in every write of a watched type).
_ACTIVE_SUBSCRIPTIONS: Final = select(FhirResourceRow.resource_id, FhirResourceRow.body).where(
    FhirResourceRow.resource_type == "Subscription",
    FhirResourceRow.id.in_(
        select(FhirIndexRow.row_id).where(
            FhirIndexRow.resource_type == "Subscription",
            FhirIndexRow.param == "status",
            FhirIndexRow.value == "active",
        )
    ),
)


def queue_notifications(
    session: Session, row_id: int, resource_type: str, resource_id: str, version: int
) -> None:
    """In the transaction that wrote version ``version`` of a resource (stored as row
    ``row_id``, its search index already written): one delivery for every active
    Subscription whose criteria that version matches. Other resource types are ignored."""
    if resource_type not in SUBSCRIBABLE:
        return
    subs = session.connection().execute(_ACTIVE_SUBSCRIPTIONS).all()
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


def _by_id(db: Database, ids: list[int]) -> list[Delivery]:
    """These deliveries, oldest due first."""
    with db.transaction() as s:
        rows = s.execute(
            select(SubscriptionDeliveryRow)
            .where(SubscriptionDeliveryRow.id.in_(ids))
            .order_by(SubscriptionDeliveryRow.next_attempt_at, SubscriptionDeliveryRow.id)
        ).scalars()
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


@lru_cache(maxsize=8)
def _cipher_at(path: Path) -> HeaderCipher:
    return HeaderCipher(path)


def channel_cipher(settings: Settings) -> HeaderCipher:
    """The cipher of channel header values: the node's key file (one per path and process)."""
    return _cipher_at(settings.subscription_key_path)


class SubscriptionNotifier:
    """Delivers due notifications every ``fhir.subscription_poll_seconds``.

    ``owner`` names this notifier's leases (default: host, process id and a random suffix);
    ``cipher`` opens the channel headers (without one, a Subscription with headers cannot
    be notified); ``resolve`` answers DNS (tests).
    """

    #: Deliveries leased at once (sent one after another).
    BATCH: Final = 20

    def __init__(
        self,
        store: SubscriptionResources,
        settings: FhirSettings,
        *,
        owner: str | None = None,
        cipher: HeaderCipher | None = None,
        resolve: Resolver = resolve_host,
    ) -> None:
        self.store = store
        self.settings = settings
        self.cipher = cipher
        self.resolve = resolve
        self.owner = owner or f"{process_owner()}/{uuid.uuid4().hex[:8]}"
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
        db = self.store.db
        # the lease covers sending the whole batch, one request after another
        lease = self.BATCH * (self.settings.subscription_timeout_seconds + 5.0)
        ids = delivery.claim_due(
            db, SubscriptionDeliveryRow, owner=self.owner, lease_seconds=lease, limit=self.BATCH
        )
        if not ids:
            return 0
        delivered = 0
        for d in _by_id(db, ids):
            try:
                self._send(d)
            except DeliveryFailed as exc:
                self._failed(d, str(exc))
                continue
            if not delivery.mark_delivered(db, SubscriptionDeliveryRow, d.id, self.owner):
                log.warning(
                    "notification %d of Subscription/%s was sent, but its lease had run out "
                    "or the Subscription was deleted meanwhile",
                    d.id,
                    d.subscription_id,
                )
                continue
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
        try:  # again at every delivery: settings and DNS answers change
            checked = check_endpoint(endpoint, self.settings, self.resolve)
        except EndpointRefused as exc:
            raise DeliveryFailed(f"{_host(endpoint)} refused: {exc}") from None
        lines = [str(h) for h in channel.get("header", [])]
        try:
            if lines and self.cipher is None:
                raise ChannelKeyError("this notifier has no key for the channel headers")
            headers = self.cipher.open(lines) if self.cipher is not None else {}
        except ChannelKeyError as exc:
            raise DeliveryFailed(str(exc)) from None
        # connect to the checked address; the host stays in Host and the TLS server name
        headers["Host"] = checked.host_header
        extensions = {"sni_hostname": checked.host} if checked.scheme == "https" else {}
        payload = str(channel.get("payload") or "")
        try:
            if payload:
                resource = self.store.get(d.resource_type, d.resource_id)
                if resource is None:
                    raise DeliveryFailed(f"{d.resource_type}/{d.resource_id} no longer exists")
                url = f"{endpoint.rstrip('/')}/{d.resource_type}/{d.resource_id}"
                headers["Content-Type"] = payload
                response = self._client.put(
                    checked.pinned_url(url),
                    content=resource.body.encode(),
                    headers=headers,
                    extensions=extensions,
                )
            else:
                response = self._client.post(
                    checked.pinned_url(endpoint), headers=headers, extensions=extensions
                )
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{_host(endpoint)}: {type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"{_host(endpoint)} answered HTTP {response.status_code}")

    def _failed(self, d: Delivery, error: str) -> None:
        s = self.settings
        state = delivery.mark_failed(
            self.store.db,
            SubscriptionDeliveryRow,
            d.id,
            self.owner,
            error,
            max_attempts=s.subscription_max_attempts,
            base=s.subscription_backoff_base_seconds,
            cap=s.subscription_backoff_max_seconds,
        )
        if state is None:
            log.warning(
                "notification %d of Subscription/%s: its lease ran out or the Subscription "
                "was deleted meanwhile; not counted",
                d.id,
                d.subscription_id,
            )
        elif state is DeliveryState.DEAD:
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
    "channel_cipher",
    "deliveries",
    "delivery_counts",
    "drop_pending",
    "parse_criteria",
    "queue_notifications",
    "subscription_status",
]
