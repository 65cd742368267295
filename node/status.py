"""`medgemma-node status`: is the SCP listening, what is the ledger doing, how full is the disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.datadir import wide_mode_warnings
from node.fhir.auth import anonymous_access_warning
from node.ledger import StudyLedger, StudySummary
from node.logfile import read_log_problem
from node.settings import Settings
from sr_templates.model import PrereadResult

STATE_ORDER = ("received", "complete", "queued", "running", "done", "failed", "skipped")


@dataclass
class ScpProbe:
    listening: bool
    detail: str
    echo_ms: float | None = None


@dataclass
class NodeStatus:
    scp: ScpProbe
    ledger_detail: str
    counts: dict[str, int]
    latest: list[dict[str, Any]]
    queue_depth: int | None
    queue_detail: str
    data_dir: str
    free_mb: int
    watermark_mb: int
    gpus: list[str] = field(default_factory=list)
    outbox: dict[str, int] = field(default_factory=dict)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    study: dict[str, Any] | None = None
    # FHIR Subscription notifications: counts by state and the latest dead ones
    notifications: dict[str, int] = field(default_factory=dict)
    dead_notifications: list[dict[str, Any]] = field(default_factory=list)
    # configuration and file modes that expose patient data (anonymous API, wide modes)
    warnings: list[str] = field(default_factory=list)
    # a node process cannot write node.log (disk full ...): path, since, reason, pid, message
    log_problem: dict[str, Any] | None = None
    # spool retention: settings, the last pass (retention-state.json), what is eligible now
    retention: dict[str, Any] = field(default_factory=dict)


def probe_scp(settings: Settings, timeout: float = 5.0) -> ScpProbe:
    """C-ECHO the configured SCP on loopback (or its bind address)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    host = settings.dicom.bind_address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    started = time.monotonic()
    assoc = ae.associate(host, settings.dicom.port, ae_title=settings.dicom.ae_title)
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            ms = (time.monotonic() - started) * 1000
            ok = status is not None and getattr(status, "Status", None) == 0
            return ScpProbe(
                ok, f"C-ECHO {'ok' if ok else 'failed'} on {host}:{settings.dicom.port}", ms
            )
        if assoc.is_rejected:
            return ScpProbe(
                True,
                f"listening on {host}:{settings.dicom.port}, but rejected this probe "
                f"(calling AE {settings.dicom.ae_title} not in dicom.allowed_callers)",
            )
        return ScpProbe(False, f"nothing answers on {host}:{settings.dicom.port}")
    finally:
        if assoc.is_established:
            assoc.release()


def queue_depth(settings: Settings) -> tuple[int | None, str]:
    if not settings.queue.broker_url:
        return None, "embedded (serve): no broker"
    try:
        import redis

        client = redis.Redis.from_url(settings.queue.broker_url, socket_timeout=3)
        q = settings.queue
        depth = int(client.llen(q.preread_queue))
        followup = int(client.llen(q.followup_queue))
        return depth, f"{q.preread_queue}={depth} {q.followup_queue}={followup}"
    except Exception as exc:
        return None, f"broker unreachable ({type(exc).__name__})"


def _study_row(s: StudySummary) -> dict[str, Any]:
    return {
        "study_uid": s.study_uid,
        "version": s.version,
        "state": s.state.value,
        "instances": s.instance_count,
        "attempts": s.attempts,
        "updated": s.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        "reason": s.reason,
        "stage": s.stage,  # the running pre-read's current stage
        "purged": s.purged_at.strftime("%Y-%m-%d %H:%M:%S") if s.purged_at else None,
    }


def collect_status(
    settings: Settings,
    *,
    study_uid: str | None = None,
    limit: int = 10,
    probe: Callable[[Settings], ScpProbe] = probe_scp,
) -> NodeStatus:
    data_dir = settings.storage.data_path
    counts: dict[str, int] = {}
    latest: list[dict[str, Any]] = []
    study: dict[str, Any] | None = None
    outbox: dict[str, int] = {}
    dead: list[dict[str, Any]] = []
    notifications: dict[str, int] = {}
    dead_notifications: list[dict[str, Any]] = []
    retention: dict[str, Any] = {}
    url = settings.storage.resolved_database_url()
    missing = settings.storage.missing_ledger()
    if missing is not None:
        ledger_detail = f"no ledger at {missing} (has a node run with this data_dir?)"
    else:
        try:
            counts, latest, study, outbox, dead = _read_ledger(url, study_uid, limit)
            ledger_detail = "ok"
            notifications, dead_notifications = _read_notifications(url)
            retention = _read_retention(settings, url)
        except Exception as exc:
            ledger_detail = f"cannot read the ledger ({type(exc).__name__}: {exc})"
    depth, detail = queue_depth(settings)
    warnings = [w for w in [anonymous_access_warning(settings)] if w]
    warnings.extend(wide_mode_warnings(data_dir))
    usage = shutil.disk_usage(data_dir if data_dir.exists() else Path.cwd())
    log_problem = read_log_problem(data_dir)
    return NodeStatus(
        scp=probe(settings),
        ledger_detail=ledger_detail,
        counts={k: counts.get(k, 0) for k in STATE_ORDER},
        latest=latest,
        queue_depth=depth,
        queue_detail=detail,
        data_dir=str(data_dir),
        free_mb=usage.free // 2**20,
        watermark_mb=settings.storage.min_free_mb,
        gpus=gpu_memory(),
        outbox=outbox,
        dead_letters=dead,
        log_tail=_log_tail(data_dir / "logs" / "node.log", 10),
        study=study,
        notifications=notifications,
        dead_notifications=dead_notifications,
        warnings=warnings,
        log_problem=log_problem.to_json() if log_problem is not None else None,
        retention=retention,
    )


def _read_ledger(
    url: str, study_uid: str | None, limit: int
) -> tuple[
    dict[str, int],
    list[dict[str, Any]],
    dict[str, Any] | None,
    dict[str, int],
    list[dict[str, Any]],
]:
    from node.outbox import DeliveryState, Outbox
    from node.settings import OutboxSettings

    ledger = StudyLedger(url)
    try:
        counts = ledger.counts_by_state()
        latest = [_study_row(s) for s in ledger.latest_studies(limit)]
        study: dict[str, Any] | None = None
        if study_uid:
            versions = ledger.study_versions(study_uid)
            study = {
                "study_uid": study_uid,
                "versions": [
                    {
                        **_study_row(v),
                        "series": [asdict(x) for x in ledger.series_of(study_uid, v.version)],
                        "result": v.result.to_json() if v.result else None,
                    }
                    for v in versions
                ],
            }
        outbox = Outbox(ledger, OutboxSettings())
        dead = [
            {
                "id": d.id,
                "study_uid": d.study_uid,
                "kind": d.kind,
                "sop_instance_uid": d.sop_instance_uid,
                "destination": d.destination,
                "attempts": d.attempts,
                "last_error": d.last_error,
            }
            for d in outbox.deliveries(state=DeliveryState.DEAD)[-10:]
        ]
        if study is not None:
            study["deliveries"] = [
                {
                    "kind": d.kind,
                    "version": d.study_version,
                    "destination": d.destination,
                    "state": d.state.value,
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                }
                for d in outbox.deliveries(study_uid=study_uid)
            ]
        counts_out = outbox.counts()
    finally:
        ledger.close()
    return counts, latest, study, counts_out, dead


def _read_notifications(url: str) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """FHIR Subscription deliveries: counts by state and the latest dead ones."""
    from node.fhir.store import FhirStore
    from node.fhir.subscriptions import subscription_status

    ledger = StudyLedger(url)
    try:
        return subscription_status(FhirStore(ledger))
    finally:
        ledger.close()


def _read_retention(settings: Settings, url: str) -> dict[str, Any]:
    """Retention settings, its last pass and the studies eligible for removal now."""
    from node.db import utcnow
    from node.retention import SpoolRetention, read_retention_state

    ledger = StudyLedger(url)
    try:
        retention = SpoolRetention(settings, ledger)
        eligible = retention.candidates()
        due = retention.due_by_age(eligible, utcnow())
    finally:
        ledger.close()
    r = settings.retention
    return {
        "days": r.days,
        "emergency_free_mb": r.emergency_free_mb,
        "interval_seconds": r.interval_seconds,
        "eligible": len(eligible),
        "eligible_bytes": sum(c.spool_bytes for c in eligible),
        "due_by_age": len(due),
        "last_run": read_retention_state(settings.storage.data_path),
    }


def render_retention(retention: dict[str, Any]) -> list[str]:
    """The Retention lines of ``status``."""
    if not retention:
        return []
    days = f"after {retention['days']:g} days" if retention["days"] else "never by age"
    out = [
        f"Retention: {days}, emergency below {retention['emergency_free_mb']} MiB free; "
        f"eligible now {retention['eligible']} studies "
        f"({retention['eligible_bytes'] / 2**20:.1f} MiB), {retention['due_by_age']} due by age"
    ]
    last = retention.get("last_run")
    if last:
        how = f" ({last['reason']})" if last.get("reason") else ""
        err = f"; FAILED: {last['error']}" if last.get("error") else ""
        out.append(
            f"  last run {last.get('started_at')}: removed {len(last.get('studies', []))} "
            f"studies, {last.get('files', 0)} files, {last.get('bytes', 0) / 2**20:.1f} MiB"
            f"{how}{err}; next run {last.get('next_run') or '-'}"
        )
    else:
        out.append("  no run recorded yet (the node runs it at start and every interval)")
    return out


def gpu_memory() -> list[str]:
    """One line per GPU from nvidia-smi (the node never imports torch); [] without GPUs."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ["nvidia-smi failed"]
    return [line.strip() for line in out.splitlines() if line.strip()]


def _log_tail(path: Path, lines: int) -> list[str]:
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 16384))
        return f.read().decode("utf-8", "replace").splitlines()[-lines:]


def render_status(status: NodeStatus) -> str:
    out: list[str] = [f"WARNING:  {w}" for w in status.warnings]
    scp = status.scp
    echo = f" ({scp.echo_ms:.0f} ms)" if scp.echo_ms is not None else ""
    out.append(f"SCP:      {'LISTENING' if scp.listening else 'DOWN'} - {scp.detail}{echo}")
    out.append(f"Queue:    {status.queue_detail}")
    low = " (BELOW WATERMARK)" if status.free_mb < status.watermark_mb else ""
    out.append(
        f"Disk:     {status.free_mb} MiB free in {status.data_dir} "
        f"(watermark {status.watermark_mb} MiB){low}"
    )
    for gpu in status.gpus:
        out.append(f"GPU:      {gpu}")
    if status.ledger_detail != "ok":
        out.append(f"Ledger:   {status.ledger_detail}")
    out.append("Studies:  " + "  ".join(f"{k}={v}" for k, v in status.counts.items()))
    if status.outbox:
        out.append("Outbox:   " + "  ".join(f"{k}={v}" for k, v in status.outbox.items()))
    for d in status.dead_letters:
        out.append(
            f"  DEAD #{d['id']} {d['kind'].upper()} of {d['study_uid']} to {d['destination']} "
            f"after {d['attempts']} attempts: {d['last_error']}"
        )
    if status.dead_letters:
        out.append("  (medgemma-node outbox list --state dead; outbox replay --all-dead | ID ...)")
    if any(status.notifications.values()):
        out.append("Notify:   " + "  ".join(f"{k}={v}" for k, v in status.notifications.items()))
    for n in status.dead_notifications:
        out.append(
            f"  DEAD notification of Subscription/{n['subscription']} ({n['endpoint']}) about "
            f"{n['resource']} after {n['attempts']} attempts: {n['last_error']}"
        )
    out.extend(render_retention(status.retention))
    if status.latest:
        out.append("Latest studies:")
        for row in status.latest:
            reason = f"  - {row['reason']}" if row["reason"] else ""
            if row.get("stage"):
                reason += f"  [stage: {row['stage']}]"
            if row.get("purged"):
                reason += f"  [files removed {row['purged']} UTC]"
            out.append(
                f"  {row['updated']}  {row['state']:<8} v{row['version']}  "
                f"{row['instances']:>3} inst  {row['study_uid']}{reason}"
            )
    if status.study is not None:
        out.append(f"Study {status.study['study_uid']}:")
        if not status.study["versions"]:
            out.append("  not in the ledger")
        for v in status.study["versions"]:
            out.append(f"  version {v['version']}: {v['state']} {v['reason']}".rstrip())
            for s in v["series"]:
                out.append(
                    f"    series {s['series_uid']} {s['modality']} {s['body_part']} "
                    f"{s['view_position']} ({s['instance_count']} inst)"
                )
            raw = v.get("result")
            out.extend(render_result(PrereadResult.from_json(raw) if raw else None))
        for d in status.study.get("deliveries", []):
            err = f" - {d['last_error']}" if d["last_error"] else ""
            out.append(
                f"  {d['kind'].upper()} v{d['version']} -> {d['destination']}: {d['state']} "
                f"({d['attempts']} attempts){err}"
            )
    if status.log_problem is not None:
        out.append(f"Log:      {status.log_problem['message']} ({status.log_problem['path']})")
    if status.log_tail:
        out.append("Last log lines:")
        out.extend(f"  {line}" for line in status.log_tail)
    return "\n".join(out)


def render_result(result: PrereadResult | None) -> list[str]:
    """A pre-read result as indented lines: notice, provenance, anchors, impression."""
    if result is None:
        return []
    lines: list[str] = []
    if result.notice:
        lines.append(f"    {result.notice}")
        lines.append(
            f"    model {result.model_id} ({result.model_revision}), "
            f"prompt {result.prompt_version}, engine {result.engine}"
        )
    for a in result.anchors:
        version = f" v{a.version}" if a.version > 1 else ""
        lines.append(
            f"    {a.anchor_id:<4} {a.kind:<8} {a.label}{version}  {a.size_text}"
            f"  uid={a.tracking_uid}"
        )
    for d in result.distances:
        lines.append(
            f"    {d.tracking_identifier}: {d.centres:.1f} {d.units} between centres, "
            f"{d.edges:.1f} {d.units} between edges"
        )
    if result.impression:
        lines.append(f"    impression: {result.impression}")
    return lines


def status_json(status: NodeStatus) -> str:
    return json.dumps(asdict(status), indent=2, default=str)
