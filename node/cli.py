"""The `medgemma-node` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from node import __version__
from node.datadir import PRIVATE_UMASK, create_private_file, private_dirs, warn_wide_modes
from node.logfile import FailSoftFileHandler
from node.logfmt import LogFormat, make_formatter
from node.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:  # imported when run: the demo's modules load only for `demo`
    from node.demo import DemoOutcome
    from node.ledger import StudyLedger

log = logging.getLogger("medgemma.cli")


def _setup_logging(
    settings: Settings | None, level: str, to_file: bool, log_format: LogFormat = "text"
) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings is not None and to_file:
        data_dir = settings.storage.data_path
        logs = data_dir / "logs"
        try:
            create_private_file(private_dirs(logs) / "node.log")  # rotated: the umask of main()
        except OSError:
            pass  # the handler reports it once, on the first record, and the node runs on
        # a full or read-only log disk is reported once (status shows it), never a traceback
        handlers.append(
            FailSoftFileHandler(
                logs / "node.log", state_dir=data_dir, max_bytes=10 * 2**20, backup_count=5
            )
        )
    formatter = make_formatter(log_format)
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    # pynetdicom logs every PDU at INFO; keep its warnings only
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _api_busy(settings: Settings, exc: OSError) -> None:
    print(
        f"medgemma-node: cannot listen on {settings.api.host}:{settings.api.port} for the "
        f"FHIR API: {exc.strerror or exc}. Is another node running? "
        "Set api.port or MEDGEMMA_NODE_API__PORT.",
        file=sys.stderr,
    )


def _start_checks(settings: Settings, *, api: bool) -> bool:
    """Before a node starts: warn about a data directory others may read; with the FHIR
    API, refuse anonymous access on a network address (False: exit 2)."""
    warn_wide_modes(settings.storage.data_path)
    if not api:
        return True
    from node.fhir.auth import check_anonymous_bind

    try:
        check_anonymous_bind(settings)
    except ConfigError as exc:
        print(f"medgemma-node: {exc}", file=sys.stderr)
        return False
    return True


def _run_node(settings: Settings, *, embedded: bool) -> int:
    from node.receivers import ReceiverStartError
    from node.runtime import NodeRuntime

    if not _start_checks(settings, api=embedded):
        return 2
    # serve runs everything in one process: the FHIR API too
    try:
        runtime = NodeRuntime(settings, embedded=embedded, api=embedded)
    except ConfigError as exc:
        print(f"medgemma-node: {exc}", file=sys.stderr)
        return 2
    try:
        host, port = runtime.start()
    except ReceiverStartError as exc:
        print(f"medgemma-node: {exc}", file=sys.stderr)
        runtime.stop()
        return 1
    except OSError as exc:
        print(
            f"medgemma-node: cannot listen on {settings.dicom.bind_address}:"
            f"{settings.dicom.port}: {exc.strerror}. Is another node running? "
            "Set dicom.port or MEDGEMMA_NODE_DICOM__PORT.",
            file=sys.stderr,
        )
        runtime.stop()
        return 2
    fhir = ""
    if runtime.api is not None:
        try:
            runtime.start_api()
        except OSError as exc:
            _api_busy(settings, exc)
            runtime.stop()
            return 2
        fhir = f", FHIR API {runtime.api.base_url}"
    mode = "embedded worker" if embedded and not settings.queue.broker_url else "Celery broker"
    if runtime.receivers is not None:
        mode += f", {runtime.receivers.processes} receiving processes"
    print(
        f"medgemma-node {__version__}: AE {settings.dicom.ae_title} on {host}:{port}{fhir}, "
        f"data in {settings.storage.data_path}, {mode}; Ctrl-C to stop",
        flush=True,
    )
    try:
        _wait_for_signal()
    finally:
        runtime.stop()
    return 0


def cmd_scp(args: argparse.Namespace, settings: Settings) -> int:
    return _run_node(settings, embedded=False)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    return _run_node(settings, embedded=True)


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from node.fhir.server import ApiServer
    from node.runtime import make_dispatcher

    if not _start_checks(settings, api=True):
        return 2
    try:
        dispatcher = make_dispatcher(settings, embedded=False)
    except ValueError as exc:
        print(f"medgemma-node api: {exc}", file=sys.stderr)
        return 2
    try:
        server = ApiServer(settings, dispatcher=dispatcher)
    except ConfigError as exc:
        print(f"medgemma-node api: {exc}", file=sys.stderr)
        dispatcher.close()
        return 2
    try:
        server.start()
    except OSError as exc:
        _api_busy(settings, exc)
        server.stop()
        dispatcher.close()
        return 2
    print(
        f"medgemma-node {__version__}: FHIR API on {server.base_url}, data in "
        f"{settings.storage.data_path}, follow-ups to queue {settings.queue.followup_queue}; "
        "Ctrl-C to stop",
        flush=True,
    )
    try:
        _wait_for_signal()
    finally:
        server.stop()
        dispatcher.close()
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from node.status import collect_status, render_status, status_json

    status = collect_status(settings, study_uid=args.study, limit=args.limit)
    print(status_json(status) if args.json else render_status(status))
    return 0 if status.scp.listening else 1


def _default_operator() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _existing_ledger(settings: Settings, command: str) -> StudyLedger | None:
    """The node's ledger for a command that reads what a node wrote; None (after a one-line
    message) when no node has made one in this data directory yet."""
    from node.ledger import StudyLedger

    missing = settings.storage.missing_ledger()
    if missing is not None:
        print(
            f"medgemma-node {command}: no ledger at {missing}; has a node run with this "
            "data_dir? (storage.data_dir or MEDGEMMA_NODE_STORAGE__DATA_DIR)",
            file=sys.stderr,
        )
        return None
    return StudyLedger(settings.storage.resolved_database_url())


def cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    """List, replay or drop SR/SEG deliveries (dead letters after ``outbox.max_attempts``)."""
    import json

    from node.outbox import DeliveryState, Outbox

    ledger = _existing_ledger(settings, "outbox")
    if ledger is None:
        return 2
    try:
        outbox = Outbox(ledger, settings.outbox)
        if args.action == "list":
            state = DeliveryState(args.state) if args.state else None
            rows = outbox.deliveries(study_uid=args.study, state=state)
            if args.json:
                print(json.dumps([d.to_json() for d in rows], indent=2))
                return 0
            if not rows:
                print("no deliveries" + (f" in state {state.value}" if state else ""))
            for d in rows:
                line = (
                    f"{d.id:>6}  {d.state.value:<9} {d.kind.upper():<3} {d.study_uid} "
                    f"v{d.study_version} -> {d.destination}  {d.attempts} attempts"
                )
                if d.state is DeliveryState.DROPPED:
                    line += f"  dropped by {d.dropped_by} {d.dropped_at:%Y-%m-%d %H:%M:%S} UTC"
                if d.last_error:
                    line += f"  - {d.last_error}"
                print(line)
            return 0
        if args.action == "replay":
            if args.all_dead == bool(args.ids):
                print("medgemma-node outbox replay: name IDs or --all-dead", file=sys.stderr)
                return 2
            outcome = outbox.replay(args.ids, all_dead=args.all_dead)
            verb = "replayed (pending again; a running node sends them)"
        else:
            outcome = outbox.drop(args.ids, by=args.by or _default_operator())
            verb = "dropped (their SR/SEG files are kept)"
        print(f"{len(outcome.changed)} {verb}: {' '.join(map(str, outcome.changed)) or '-'}")
        for delivery_id, why in outcome.refused.items():
            print(f"  {delivery_id} left as it is: {why}", file=sys.stderr)
        return 1 if outcome.refused else 0
    finally:
        ledger.close()


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.queue.broker_url:
        print(
            "medgemma-node worker: queue.broker_url is empty. Set it, e.g. "
            "MEDGEMMA_NODE_QUEUE__BROKER_URL=redis://127.0.0.1:6379/0",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    if args.config:
        env["MEDGEMMA_NODE_CONFIG"] = str(args.config)
    if args.log_format:  # the worker process formats its own lines (workers/celery_app.py)
        env["MEDGEMMA_NODE_LOGGING__FORMAT"] = args.log_format
    # the engine check runs in the worker's own package (the node never imports it)
    preflight = subprocess.call([sys.executable, "-m", "workers.preflight"], env=env)
    if preflight != 0:
        return preflight
    queues = args.queues or f"{settings.queue.preread_queue},{settings.queue.followup_queue}"
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app:app", "worker",
        "--queues", queues, "--concurrency", str(args.concurrency), "--pool", args.pool,
        "--loglevel", args.log_level.upper(), "--without-gossip", "--without-mingle",
        "--hostname", args.hostname,
    ]  # fmt: skip
    return subprocess.call(argv, env=env)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import secrets
    from pathlib import Path

    from node.demo import DemoError, demo_settings, run_demo

    data_dir = Path(args.data_dir) if args.data_dir else settings.storage.data_path / "demo"
    token = secrets.token_urlsafe(24)  # a new one each run: printed for the review page
    demo = demo_settings(data_dir, args.port, token, api_port=args.api_port)
    print(
        "medgemma-node demo: a synthetic two-view chest study (DEMO engine, not for clinical "
        f"use) through a node on 127.0.0.1, data in {demo.storage.data_path}",
        flush=True,
    )
    shown: list[int] = []

    def show_and_hold(outcome: DemoOutcome) -> None:
        shown.append(_print_demo(outcome, demo, token))
        if args.keep_running:
            print("node       kept running for the review page: Ctrl-C to stop", flush=True)
            _wait_for_signal()
            print("node       stopped", flush=True)

    try:
        run_demo(demo, token, timeout=args.timeout, while_up=show_and_hold)
    except (DemoError, OSError) as exc:
        print(f"medgemma-node demo failed: {exc}", file=sys.stderr)
        return 1
    return shown[0]


def _print_demo(outcome: DemoOutcome, demo: Settings, token: str) -> int:
    """Print what the demo did (and where to review it); its exit status."""
    from node.status import render_result

    study = outcome.study
    print(f"study      {study.study_uid} version {study.version}: {study.state.value}")
    if study.reason:
        print(f"reason     {study.reason}")
    print(f"received   {study.instance_count} instances in {outcome.spool_dir}")
    print(f"ledger     {demo.storage.resolved_database_url()}")
    for line in render_result(study.result):
        print(line.strip())
    outputs = study.result.outputs if study.result else None
    for kind, ref in (
        ("sr", outputs.sr if outputs else None),
        ("seg", outputs.seg if outputs else None),
    ):
        if ref is not None:
            print(f"{kind.upper():<10} {ref.path}")
    if outcome.fhir is not None:
        f = outcome.fhir
        print(f"FHIR       {outcome.fhir_base}/DiagnosticReport/{f.report_id} ({f.report_status})")
    for n, turn in enumerate(outcome.turns, 1):
        print(f"\n[{n}] {turn.language} question: {turn.question}")
        print(f"    answer ({turn.status}, about {', '.join(turn.about)}):")
        for line in turn.answer.splitlines():
            print(f"      {line}" if line.strip() else "")
    print(f"took       {outcome.seconds:.1f} s")
    print(f"review     {outcome.review_url} (token {token}; AI-generated, preliminary, DEMO)")
    answered = all(t.status == "completed" for t in outcome.turns)
    ok = study.state.value == "done" and outcome.fhir is not None and answered
    return 0 if ok and outcome.turns else 1


# loaded by name: node/ never imports workers/ (the resolver needs no model)
_RESOLVER = "workers.dialogue.resolve"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:
    import importlib
    import json
    from pathlib import Path

    def fail(message: str) -> int:
        print(f"medgemma-node resolve: {_one_line(message)}", file=sys.stderr)
        return 2

    resolver = importlib.import_module(_RESOLVER)
    path = Path(args.anchors)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return fail(f"cannot read the anchor file {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        return fail(f"the anchor file {path} is not UTF-8 text")
    except json.JSONDecodeError as exc:
        return fail(f"the anchor file {path} is not JSON: {exc.msg} (line {exc.lineno})")
    try:
        anchors = resolver.parse_anchor_list(data)
    except ValueError as exc:
        return fail(f"the anchor file {path}: {exc}")
    focus = args.focus.strip().upper() if args.focus else None
    try:
        resolution = resolver.resolve(" ".join(args.question), anchors, focus=focus)
    except ValueError as exc:
        return fail(f"--focus: {exc}")
    print(json.dumps(resolver.resolution_json(resolution), ensure_ascii=False))
    return 0


def cmd_retention(args: argparse.Namespace, settings: Settings) -> int:
    """One spool retention pass: what would go (--dry-run) or remove it now (--now)."""
    from node.retention import SpoolRetention, write_retention_state

    ledger = _existing_ledger(settings, "retention")
    if ledger is None:
        return 2
    try:
        report = SpoolRetention(settings, ledger).run_once(dry_run=args.dry_run)
        if not args.dry_run:
            write_retention_state(settings.storage.data_path, report)
    finally:
        ledger.close()
    verb = "would remove" if args.dry_run else "removed"
    why = f" ({report.reason})" if report.reason else ""
    print(
        f"{verb} {len(report.studies)} of {report.eligible} eligible studies{why}: "
        f"{report.files} files, {report.bytes / 2**20:.1f} MiB; "
        f"{report.free_mb_after} MiB free"
    )
    for uid in report.studies:
        print(f"  {uid}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgemma-node",
        description=(
            "A DICOM node that adds AI-generated, preliminary MedGemma chest X-ray pre-reads "
            "to a PACS. Not a diagnosis; every output says so."
        ),
    )
    parser.add_argument("--version", action="version", version=f"medgemma-node {__version__}")
    parser.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or one JSON object each (default: logging.format, text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="everything in one process (SCP + FHIR API + embedded worker)")
    p.add_argument("--engine", choices=["medgemma", "vllm", "demo"], help="override engine.name")
    p.set_defaults(func=cmd_serve, to_file=True)

    p = sub.add_parser("scp", help="the DICOM SCP; queues pre-reads on the Celery broker")
    p.set_defaults(func=cmd_scp, to_file=True)

    p = sub.add_parser("api", help="the FHIR R4 API; sends follow-up questions to the broker")
    p.set_defaults(func=cmd_api, to_file=True)

    p = sub.add_parser("worker", help="a Celery worker on queues preread and/or followup")
    p.add_argument("--queues", help="comma-separated (default: preread,followup)")
    p.add_argument("--engine", choices=["medgemma", "vllm", "demo"], help="override engine.name")
    p.add_argument("--concurrency", type=int, default=1, help="processes (default 1 per GPU)")
    p.add_argument("--pool", default="prefork", help="Celery pool (default prefork)")
    p.add_argument("--hostname", default="medgemma@%h", help="Celery node name")
    p.set_defaults(func=cmd_worker, to_file=False)

    p = sub.add_parser("demo", help="run a bundled synthetic chest study through the whole loop")
    p.add_argument("--data-dir", help="where the demo keeps its data (default: <data_dir>/demo)")
    p.add_argument("--port", type=int, default=0, help="DICOM port (default: any free port)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for results")
    p.add_argument("--api-port", type=int, default=0, help="API + review page port (default: any)")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the node up after the demo (review page) until Ctrl-C",
    )
    p.set_defaults(func=cmd_demo, to_file=False)

    p = sub.add_parser("status", help="SCP health, ledger counts, latest studies, queue, disk")
    p.add_argument("--study", help="details of one study (StudyInstanceUID)")
    p.add_argument("--limit", type=int, default=10, help="latest studies to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status, to_file=False)

    p = sub.add_parser("outbox", help="SR/SEG deliveries: list, replay or drop dead letters")
    p.set_defaults(func=cmd_outbox, to_file=False)
    ops = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    o = ops.add_parser("list", help="deliveries, oldest first (id, state, study, destination)")
    o.add_argument("--state", choices=["pending", "delivered", "dead", "dropped"])
    o.add_argument("--study", help="one study (StudyInstanceUID)")
    o.add_argument("--json", action="store_true", help="machine-readable output")
    o = ops.add_parser("replay", help="send dead (or dropped) deliveries again, each once")
    o.add_argument("--all-dead", action="store_true", help="every dead delivery")
    o.add_argument("ids", nargs="*", type=int, metavar="ID", help="delivery ids (outbox list)")
    o = ops.add_parser("drop", help="give up on dead or pending deliveries (files are kept)")
    o.add_argument("ids", nargs="+", type=int, metavar="ID", help="delivery ids (outbox list)")
    o.add_argument("--by", help="who drops them (default: user@host)")

    p = sub.add_parser(
        "retention", help="spool retention: list (--dry-run) or remove (--now) eligible studies"
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--dry-run", action="store_true", help="list what a pass would remove")
    how.add_argument("--now", action="store_true", help="run one pass now")
    p.set_defaults(func=cmd_retention, to_file=False)

    p = sub.add_parser(
        "resolve",
        help="which anchors a follow-up question is about (no model): prints JSON",
        description=(
            'Prints {"anchors": [...]} (in the order the question names them), '
            '{"clarify": [candidates]} or {"new_region": "<site or landmark>"}.'
        ),
    )
    p.add_argument("--anchors", required=True, help="JSON list of anchors (anchor_id, kind, "
                   "label, finding, site, laterality, attributes)")  # fmt: skip
    p.add_argument("--focus", help="the anchor in focus, e.g. A1 ('this lesion', 'it')")
    p.add_argument("question", nargs="+", help="the question, English or Chinese")
    p.set_defaults(func=cmd_resolve, to_file=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "engine", None):
        os.environ["MEDGEMMA_NODE_ENGINE__NAME"] = args.engine
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"medgemma-node: {exc}", file=sys.stderr)
        return 2
    # what the node and its workers create holds patient data: never readable by others
    os.umask(PRIVATE_UMASK)
    _setup_logging(
        settings, args.log_level, args.to_file, args.log_format or settings.logging.format
    )
    try:
        return int(args.func(args, settings))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
