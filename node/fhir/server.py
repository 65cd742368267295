"""Serving the FHIR API: uvicorn in a background thread, plus the Subscription notifier.

Used by ``medgemma-node api`` (with the Celery dispatcher) and by ``serve`` (with the
in-process worker). The listening socket is bound in :meth:`ApiServer.start`, so a busy
port is an OSError there (a clear CLI message), and port 0 picks a free one (tests).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from node.datadir import private_dirs
from node.dispatch import Dispatcher
from node.fhir.deps import DB_THREADS
from node.fhir.main import create_app
from node.fhir.store import FhirStore
from node.fhir.subscriptions import SubscriptionNotifier, channel_cipher
from node.settings import Settings

log = logging.getLogger("medgemma.fhir.server")


class ApiServer:
    """The FHIR API of a node on ``api.host``:``api.port`` (uvicorn, one thread)."""

    def __init__(
        self,
        settings: Settings,
        *,
        dispatcher: Dispatcher | None = None,
        notify: bool = True,
    ) -> None:
        self.settings = settings
        private_dirs(settings.storage.data_path)  # patient data: 0700
        # its own engine (even in serve): a pool as large as the API's database threads
        self.store = FhirStore(settings.storage.resolved_database_url(), pool_size=DB_THREADS + 2)
        self.app = create_app(settings, store=self.store, dispatcher=dispatcher)
        self.notifier = (
            SubscriptionNotifier(self.store, settings.fhir, cipher=channel_cipher(settings))
            if notify
            else None
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.host = settings.api.host
        self.port = settings.api.port

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}/fhir"

    def start(self, timeout: float = 30.0) -> tuple[str, int]:
        """Bind, start serving in a thread, and return (host, port) once it accepts."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(2048)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,  # its lines carry query strings (patient identifiers)
            # forwarded headers count only from fhir.trusted_proxies (node.fhir.deps.base_url)
            proxy_headers=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        # uvicorn's access lines carry query strings (patient identifiers): never emit them
        logging.getLogger("uvicorn.access").disabled = True
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fhir-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the FHIR API did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        if self.notifier is not None:
            self.notifier.start()
        log.info("FHIR API on %s", self.base_url)
        return self.host, self.port

    def stop(self) -> None:
        if self.notifier is not None:
            self.notifier.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._socket is not None:
            self._socket.close()
        audit = self.app.state.audit
        if audit is not None:
            audit.close()
        ctx = self.app.state.ctx
        for worker in (ctx.writer, ctx.publisher):
            if worker is not None:
                worker.close()
        self.store.close()
