"""Wake-ups for the outbox senders: a new SR/SEG leaves at once, not at the next poll.

Whoever adds outbox rows calls :func:`ring` once they are committed. It wakes

- the senders of this process (``serve``: the embedded worker and the node's sender share
  it) through a :class:`threading.Event` each, and
- the senders of other processes (``scp`` + Celery workers) through a Redis ``PUBLISH`` on
  the broker both already use; the node's :class:`RemoteWakeups` thread subscribes and
  sets its sender's event.

Both are hints, never the guarantee: the rows are durable before the ring, the sender still
polls every ``outbox.poll_seconds``, and its leased claim keeps each row single however
many senders wake. A lost message (Redis away, a broker that is not Redis) costs at most
one poll.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Any

log = logging.getLogger("medgemma.wakeup")

#: The Redis channel the workers publish on and the node's sender listens to.
CHANNEL = "medgemma-node:outbox"

_local: set[threading.Event] = set()
_local_lock = threading.Lock()


def listen(event: threading.Event) -> None:
    """Have :func:`ring` set ``event`` (a sender of this process)."""
    with _local_lock:
        _local.add(event)


def unlisten(event: threading.Event) -> None:
    with _local_lock:
        _local.discard(event)


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


@lru_cache(maxsize=4)
def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


def ring(broker_url: str = "") -> None:
    """New outbox rows are committed: wake this process's senders, and the other
    processes' through Redis when ``broker_url`` is a Redis URL. Never raises."""
    with _local_lock:
        events = list(_local)
    for event in events:
        event.set()
    if not broker_url or not is_redis(broker_url):
        return
    try:
        _client(broker_url).publish(CHANNEL, b"due")
    except Exception as exc:  # the poll delivers it anyway
        log.debug("outbox wake-up not published: %s", exc)


class RemoteWakeups:
    """A thread that sets ``event`` on every message on :data:`CHANNEL` (the node's sender,
    woken by workers in other processes). Reconnects after a Redis failure; while Redis is
    away the sender's poll is what delivers."""

    def __init__(self, broker_url: str, event: threading.Event) -> None:
        self.broker_url = broker_url
        self.event = event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medgemma-wakeups", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import redis

        backoff = 0.5
        warned = False
        while not self._stop.is_set():
            client = redis.Redis.from_url(
                self.broker_url, socket_connect_timeout=2, health_check_interval=30
            )
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                if warned:
                    log.info("outbox wake-ups from the workers received again")
                warned, backoff = False, 0.5
                self.event.set()  # anything published while we were away
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        self.event.set()
                pubsub.close()
            except Exception as exc:
                if not warned:
                    log.warning(
                        "outbox wake-ups from the workers unavailable (%s): results are "
                        "delivered by the poll until Redis answers again",
                        exc,
                    )
                    warned = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                client.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
