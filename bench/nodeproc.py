"""Start and stop a node (``medgemma-node <command>``) or any other server as a subprocess,
for the tests and the benchmarks alike.

A process is started in its own session with its output in a log file, and is ready when
a condition holds (the SCP answers C-ECHO, ``/fhir/metadata`` answers 200, a line appears
in the log), polled until a deadline, never after a fixed sleep. Stopping sends SIGTERM
to the whole process group (a Celery worker's pool, storescp's forked children), waits,
and kills what is left. A process that exits early or is not ready in time raises
:class:`NotReady` with the tail of its log, which is what one needs to see the cause.

Why here: the benchmarks must not import the ``tests`` package (its modules pull in pytest
and the peers' fixtures), and the node package must not carry test scaffolding, so this
one module under ``bench/`` is imported by both (``tests.peers`` re-exports
:func:`free_port` and :func:`wait_for`). It needs the standard library and pynetdicom
only, which the node itself depends on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

__all__ = [
    "REPO",
    "NotReady",
    "ServerProcess",
    "dicom_echo",
    "free_port",
    "http_ok",
    "node_argv",
    "node_environment",
    "start_node",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 40

T = TypeVar("T")


class NotReady(AssertionError):
    """A condition was not met by its deadline, or a server exited before it was ready.

    An AssertionError, so that pytest reports it as a test failure, not as an error."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value; return it.

    Exceptions of the types in ``ignore`` count as "not yet". On timeout raise
    :class:`NotReady` naming ``what`` (and the last ignored exception, if any).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise NotReady(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------- conditions


def dicom_echo(
    port: int, ae_title: str = "MEDGEMMA", host: str = "127.0.0.1", calling: str = "NODEPROC"
) -> Callable[[], bool]:
    """A readiness condition: the DICOM SCP at host:port answers C-ECHO with Success."""

    def answered() -> bool:
        try:  # a cheap TCP probe first: pynetdicom logs every refused association as an error
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            return False
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 5
        assoc = ae.associate(host, port, ae_title=ae_title)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == 0
        finally:
            assoc.release()

    return answered


def http_ok(url: str, status: int = 200) -> Callable[[], bool]:
    """A readiness condition: a GET of ``url`` answers ``status``."""

    def answered() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == status)
        except urllib.error.HTTPError as exc:
            return exc.code == status
        except (OSError, ValueError):
            return False

    return answered


# --------------------------------------------------------------------------- processes


class ServerProcess:
    """A server subprocess in its own session, its stdout and stderr in ``log``."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        name: str | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or " ".join(self.argv[:4])
        self.log = log
        self.env = dict(os.environ if env is None else env)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() signals the group: pools and forked children
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        """Everything the process has written so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def describe(self) -> str:
        """The process, its state and its log tail: for a failure message."""
        code = self.process.poll()
        state = "running" if code is None else f"exited with {code}"
        tail = self.log_tail()
        return f"{self.name} (pid {self.pid}, {state}); last lines of {self.log}:\n{tail}"

    def log_has(self, text: str) -> Callable[[], bool]:
        """A readiness condition: ``text`` appears in the log."""
        return lambda: text in self.output()

    def wait_ready(self, ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll ``ready`` until it holds; NotReady with the log tail when the process exits
        first or ``timeout`` seconds pass."""

        def check() -> bool:
            if ready():
                return True
            if not self.running():
                raise NotReady(f"{what}: the process exited first: {self.describe()}")
            return False

        try:
            wait_for(check, timeout=timeout, interval=0.1, what=what)
        except NotReady as exc:
            if self.running():
                raise NotReady(f"{exc}: {self.describe()}") from None
            raise

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM to the process group, wait up to ``timeout`` s, then SIGKILL; the exit
        code (negative: the signal that ended it)."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        else:
            self._signal(signal.SIGKILL)  # children the leader left behind
        self._out.close()
        return self.process.returncode

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def node_argv(command: Sequence[str], config: Path | None = None) -> list[str]:
    """``medgemma-node [--config FILE] <command...>`` as this interpreter runs it."""
    options = ["--config", str(config)] if config is not None else []
    return [sys.executable, "-m", "node.cli", *options, *command]


def node_environment(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without MEDGEMMA_NODE_* settings (so a developer's
    shell cannot change what a test or benchmark runs), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_NODE_")}
    env.update(overrides or {})
    return env


def start_node(
    command: Sequence[str],
    *,
    log: Path,
    ready: Callable[[ServerProcess], Callable[[], bool]] | None,
    what: str,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> ServerProcess:
    """Start ``medgemma-node [--config FILE] <command>`` and wait until it is ready.

    ``env``: MEDGEMMA_NODE_* settings over a clean environment (see
    :func:`node_environment`). ``ready`` makes the condition from the process (e.g.
    ``lambda p: dicom_echo(port)`` or ``lambda p: p.log_has("ready")``); None: do not
    wait. The process is stopped when it does not become ready.
    """
    proc = ServerProcess(
        node_argv(command, config),
        log=log,
        env=node_environment(env),
        name=f"medgemma-node {' '.join(command)}",
    )
    if ready is not None:
        try:
            proc.wait_ready(ready(proc), what, timeout)
        except BaseException:
            proc.stop()
            raise
    return proc
