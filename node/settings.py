"""Configuration: one Settings class from defaults, a TOML file and environment variables.

Precedence (highest first): environment ``MEDGEMMA_NODE_<SECTION>__<KEY>``, the TOML file
given with ``--config`` (or ``MEDGEMMA_NODE_CONFIG``), then the defaults below, which
``config/node.toml`` mirrors.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

AE_TITLE_MAX = 16


def _check_ae_title(value: str, what: str) -> str:
    if not value or len(value) > AE_TITLE_MAX or not value.isascii() or "\\" in value:
        raise ValueError(f"{what} {value!r} must be 1-16 ASCII characters without backslash")
    return value


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    return host.strip("[]").lower() == "localhost" or _is_loopback_ip(host.strip("[]"))


class Section(BaseModel):
    """A [section] of the configuration: a misspelt key is an error naming it, never
    silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TlsSettings(Section):
    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # set to require and verify client certificates
    require_client_cert: bool = False


class DicomSettings(Section):
    ae_title: str = "MEDGEMMA"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_callers: list[str] = Field(default_factory=list)  # AE titles; empty = any caller
    allowed_hosts: list[str] = Field(default_factory=list)  # IP addresses; empty = any host
    max_associations: int = Field(default=16, ge=1)
    max_associations_per_host: int = Field(default=8, ge=1)  # open connections per IP address
    # processes that receive C-STORE (node.receivers); 1: the node's own process; 0: one per
    # CPU core. More use more cores when several associations arrive at once; each takes
    # max_associations / N
    receiver_processes: int = Field(default=1, ge=0, le=64)
    # also: a connection's A-ASSOCIATE-RQ must be complete this long after it opened
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = 60.0
    # also: every PDU must be complete this long after its first byte
    network_timeout: float = Field(default=120.0, gt=0)
    # the largest P-DATA PDU a peer may send (announced; larger ones are aborted unread);
    # 0, which older configs wrote for "unlimited", means the default
    maximum_pdu_size: int = Field(default=1_048_576, ge=4096, le=64 * 2**20)
    # one received dataset (a deflated one: inflated); larger ones are refused
    max_dataset_mb: int = Field(default=2048, ge=1)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v, "dicom.ae_title")

    @field_validator("maximum_pdu_size", mode="before")
    @classmethod
    def _pdu_zero_is_default(cls, v: object) -> object:
        # configs written before the limit existed said 0 (unlimited): keep them loading
        return 1_048_576 if v == 0 else v

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, v: list[str]) -> list[str]:
        return [_check_ae_title(a.strip(), "dicom.allowed_callers entry") for a in v]

    @property
    def receiving_processes(self) -> int:
        """``receiver_processes`` with 0 resolved to the CPU cores this process may use."""
        if self.receiver_processes:
            return self.receiver_processes
        usable = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core
        cores = len(usable(0)) if usable is not None else os.cpu_count() or 1
        return max(1, min(64, cores))


class StorageSettings(Section):
    data_dir: str = "./var"
    database_url: str = ""  # empty = SQLite file in data_dir
    min_free_mb: int = Field(default=512, ge=0)  # below this, C-STORE answers Out of Resources

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def spool_path(self) -> Path:
        return self.data_path / "spool"

    @property
    def results_path(self) -> Path:
        """Where SR/SEG files are written: ``<results_path>/<StudyInstanceUID>/``."""
        return self.data_path / "results"

    @property
    def receive_path(self) -> Path:
        """Where C-STORE datasets are written while they arrive (emptied at start)."""
        return self.data_path / "receiving"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite ledger file used when ``database_url`` is empty."""
        return self.data_path / "ledger.sqlite3"

    def missing_ledger(self) -> Path | None:
        """The SQLite file a command expected to find, when no node has made it yet (None
        when it exists or the ledger is a database server)."""
        return None if self.database_url or self.sqlite_path.is_file() else self.sqlite_path

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.sqlite_path}"


class CompletionSettings(Section):
    quiet_seconds: float = Field(default=5.0, ge=0)  # a study is complete after this quiet time
    # also complete a study when the association that sent it ends, once nothing new arrived
    # for release_grace_seconds after it (a sender that sends one series per association
    # back to back stays one version); callers in quiet_only_callers wait for quiet_seconds
    on_association_release: bool = True
    release_grace_seconds: float = Field(default=0.3, ge=0)
    # sooner: from this long after the release on, as soon as the sender's host has no
    # connection open to the node (it is not sending a next association); set it to
    # release_grace_seconds to always wait the whole grace time
    release_host_idle_seconds: float = Field(default=0.1, ge=0)
    quiet_only_callers: list[str] = Field(default_factory=list)  # calling AE titles
    poll_seconds: float = Field(default=0.5, gt=0)


DEFAULT_CHEST_TERMS = [
    "CHEST",
    "THORAX",
    "THORACIC",
    "LUNG",
    "LUNGS",
    "PULMONARY",
    "CXR",
    "TORAX",
    "TÓRAX",
    "BRUSTKORB",
    "POITRINE",
    "TORACE",
    "TORAKS",
    "胸",
    "胸部",
    "胸片",
    "肺",
]


class PrereadSettings(Section):
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    # matched case-insensitively as words (or substrings for CJK) in BodyPartExamined,
    # StudyDescription, SeriesDescription, ProtocolName; ViewPosition PA/AP/LL/LAT also counts
    chest_terms: list[str] = Field(default_factory=lambda: list(DEFAULT_CHEST_TERMS))
    chest_view_positions: list[str] = Field(
        default_factory=lambda: ["PA", "AP", "LL", "RL", "LAT", "LATERAL"]
    )
    # a CR/DX study with no body part information at all (BodyPartExamined, ViewPosition,
    # descriptions and protocol empty) is skipped; true: the engine is asked first whether
    # its image is a frontal chest radiograph, and the study is read or skipped on its answer
    ask_engine_if_unlabelled: bool = False


class QueueSettings(Section):
    broker_url: str = ""  # empty = embedded (serve); redis://... otherwise
    preread_queue: str = "preread"
    followup_queue: str = "followup"
    requeue_after_seconds: float = Field(default=1200.0, gt=0)  # stuck in complete/queued/running
    reconcile_interval_seconds: float = Field(default=15.0, gt=0)
    # a running pre-read holds its study this long and renews it every quarter of it; when
    # the worker dies the lease runs out and the reconciler re-sends the study (never beyond
    # task_time_limit_seconds after the run started)
    run_lease_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    task_soft_time_limit_seconds: float = Field(default=600.0, gt=0)
    task_time_limit_seconds: float = Field(default=900.0, gt=0)
    # a pre-read task also claims up to max_batch - 1 other queued studies from the ledger
    # and runs them as one engine batch (1 = one study per task); a batch shares the task's
    # time limits, so raise them with it
    max_batch: int = Field(default=8, ge=1, le=256)
    # send a study's follow-ups to the worker that read it (it holds the study's image
    # prefix in memory: transformers engine, engine.prefix_cache_studies > 0) when that
    # worker is alive, idle and consumes followup_queue; else, and when it has not started
    # the question within followup_affinity_wait_seconds (or it is gone), the shared queue
    followup_affinity: bool = True
    followup_affinity_wait_seconds: float = Field(default=10.0, gt=0)
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)  # gone after 3 missed beats


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class StaticToken(Section):
    """A bearer token given to one client (e.g. the RIS): its SHA-256 and its scopes.

    Only the hash is configured, never the token: ``printf %s TOKEN | sha256sum``.
    """

    name: str  # who holds it; written into AuditEvents and logs instead of the token
    sha256: str
    scopes: list[str] = Field(default_factory=list)  # e.g. "system/DiagnosticReport.read"

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower()
        if len(v) != 64 or any(ch not in "0123456789abcdef" for ch in v):
            raise ValueError("auth.tokens sha256 must be 64 hexadecimal digits")
        return v


class AuthSettings(Section):
    """Who may use the FHIR API: static tokens and/or JWTs from one issuer (SMART scopes)."""

    required: bool = True  # false only on a closed test network; accesses are still audited
    # with required = false: anonymous callers get system/*.*; serve/api refuse to start on a
    # non-loopback api.host unless this says so as well
    allow_anonymous_on_network: bool = False
    tokens: list[StaticToken] = Field(default_factory=list)
    jwt_issuer: str = ""  # empty = no JWTs accepted
    jwt_audience: str = ""  # empty = the aud claim is not checked
    jwks_file: str = ""  # a JWKS JSON file, or
    jwks_url: str = ""  # the issuer's JWKS URL (keys cached)
    token_endpoint: str = ""  # the issuer's token URL, for SMART discovery (empty = not shown)
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    leeway_seconds: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _jwks(self) -> AuthSettings:
        if self.jwt_issuer and not (self.jwks_file or self.jwks_url):
            raise ValueError("auth.jwt_issuer needs auth.jwks_file or auth.jwks_url")
        return self


class FhirSettings(Section):
    """The FHIR R4 endpoint: identifiers, limits, follow-up waiting and subscriptions."""

    base_url: str = ""  # public base, e.g. https://node.example/fhir; empty = see trusted_proxies
    # proxies (IPs/CIDRs) whose X-Forwarded-Host/-Proto or Forwarded headers set the links'
    # base when base_url is empty; empty = none: links use the address the API listens on
    trusted_proxies: list[str] = Field(default_factory=list)
    patient_id_system: str = ""  # Identifier.system of DICOM PatientID (e.g. urn:oid:...)
    accession_system: str = ""  # Identifier.system of AccessionNumber
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    page_size: int = Field(default=20, ge=1)
    max_page_size: int = Field(default=200, ge=1)
    respond_sync_timeout_seconds: float = Field(default=30.0, gt=0)  # Prefer: respond-sync
    subscription_max_attempts: int = Field(default=8, ge=1)
    subscription_backoff_base_seconds: float = Field(default=5.0, gt=0)
    subscription_backoff_max_seconds: float = Field(default=600.0, gt=0)
    subscription_poll_seconds: float = Field(default=1.0, gt=0)
    subscription_timeout_seconds: float = Field(default=10.0, gt=0)
    # URL prefixes a Subscription may call (https; http only to a loopback IP); empty = none
    subscription_allowed_endpoints: list[str] = Field(default_factory=list)
    # private/loopback/link-local networks (CIDR) an endpoint may resolve to; empty = none
    subscription_allowed_networks: list[str] = Field(default_factory=list)
    # key that encrypts channel.header values at rest; empty = <data_dir>/secrets/subscription.key
    subscription_key_file: str = ""

    @field_validator("subscription_allowed_endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        for entry in v:
            parts = urllib.parse.urlsplit(entry.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"fhir.subscription_allowed_endpoints entry {entry!r} must be an "
                    "https://host[:port]/path prefix"
                )
            if parts.username is not None or parts.password is not None:
                raise ValueError(f"fhir.subscription_allowed_endpoints entry {entry!r} has a user")
            if parts.scheme == "http" and not _is_loopback_ip(parts.hostname):
                raise ValueError(
                    f"fhir.subscription_allowed_endpoints entry {entry!r}: plain http is "
                    "allowed only to a loopback IP address (127.0.0.1, ::1); use https"
                )
        return [e.strip() for e in v]

    @field_validator("subscription_allowed_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"fhir.subscription_allowed_networks entry {entry!r} is not a network "
                    "(CIDR, e.g. 10.20.0.0/16)"
                ) from None
        return [e.strip() for e in v]

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"fhir.trusted_proxies entry {entry!r} is not an IP address or network "
                    "(e.g. 10.0.0.7 or 10.20.0.0/16)"
                ) from None
        return [e.strip() for e in v]

    @field_validator("base_url")
    @classmethod
    def _base(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("fhir.base_url must be empty or an http(s) URL")
        return v.rstrip("/")


class EngineSettings(Section):
    name: Literal["medgemma", "vllm", "demo"] = "medgemma"
    # MedGemma 1.5: chest X-ray anatomy localisation IoU 38.0 against 3.1 for MedGemma 1 4B
    # (model cards); anchors and localised regions stand on its boxes. MedGemma 1
    # (google/medgemma-4b-it) stays selectable.
    model: str = "google/medgemma-1.5-4b-it"
    revision: str = "main"
    local_files_only: bool = True
    device: str = "auto"  # auto | cuda | cpu
    server_url: str = ""  # vllm: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    # medgemma: studies whose whole-image prompt prefix is kept as a KV cache for follow-ups
    # (least recently used evicted; 0 = off)
    prefix_cache_studies: int = Field(default=4, ge=0)
    # demo only, for tests of faults during a pre-read: sleep this long before each answer
    demo_delay_seconds: float = Field(default=0.0, ge=0)


class Destination(Section):
    """Where SR and SEG go: a DICOM AE (C-STORE) or a DICOMweb server (STOW-RS)."""

    kind: Literal["dicom", "dicomweb"] = "dicom"
    ae_title: str = ""
    host: str = ""
    port: int = Field(default=104, ge=1, le=65535)
    url: str = ""  # dicomweb: the DICOMweb root, e.g. http://pacs:8042/dicom-web

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind == "dicom":
            _check_ae_title(self.ae_title, "destinations.ae_title")
            if not self.host:
                raise ValueError("a dicom destination needs host (and port)")
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError("a dicomweb destination needs url = http(s)://.../dicom-web")
        return self

    @property
    def key(self) -> str:
        """A stable name for logs and the outbox: AE@host:port or the DICOMweb URL."""
        if self.kind == "dicomweb":
            return self.url.rstrip("/")
        return f"{self.ae_title}@{self.host}:{self.port}"


class OutboxSettings(Section):
    max_attempts: int = Field(default=8, ge=1)  # then the delivery is dead-lettered
    backoff_base_seconds: float = Field(default=5.0, gt=0)  # 5, 10, 20, 40 ... seconds
    backoff_max_seconds: float = Field(default=600.0, gt=0)
    # the sender's fallback poll: a worker that writes results wakes it at once (in process,
    # or by a Redis PUBLISH on the broker), so this bounds only a lost wake-up and retries
    poll_seconds: float = Field(default=1.0, gt=0)


class RetentionSettings(Section):
    """Spool retention: what the node removes from ``<data_dir>/spool`` and ``results``.

    A study is eligible once every version is finished (done, failed, skipped), every
    SR/SEG delivery of it is delivered or dropped and no follow-up question about it is
    open; the ledger rows stay (marked purged). The PACS is the archive.
    """

    # eligible studies whose last activity is older than this are removed; 0 = never by age
    days: float = Field(default=30.0, ge=0)
    # below this free space (MiB) on the spool's disk, eligible studies are removed oldest
    # first until it is free again, whatever their age; 0 = no emergency clean
    emergency_free_mb: int = Field(default=1024, ge=0)
    interval_seconds: float = Field(default=3600.0, gt=0)  # how often the node checks


class MetricsSettings(Section):
    """Prometheus metrics: /metrics on the FHIR API, and a listener of its own (``scp``)."""

    port: int = Field(default=0, ge=0, le=65535)  # the node's own /metrics listener; 0 = off
    bind_address: str = "127.0.0.1"
    # SHA-256 of a bearer token /metrics requires (printf %s TOKEN | sha256sum); empty = none
    token_sha256: str = ""

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower()
        if v and (len(v) != 64 or any(ch not in "0123456789abcdef" for ch in v)):
            raise ValueError("metrics.token_sha256 must be empty or 64 hexadecimal digits")
        return v


class LoggingSettings(Section):
    # text: one human-readable line per record; json: one JSON object per line (study_uid,
    # request_id fields); the CLI's --log-format overrides it
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """All configuration of one node. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="MEDGEMMA_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )
    toml_file: ClassVar[Path | None] = None

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    preread: PrereadSettings = Field(default_factory=PrereadSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    destinations: list[Destination] = Field(default_factory=list)

    @property
    def subscription_key_path(self) -> Path:
        """The key file that encrypts Subscription channel headers at rest."""
        if self.fhir.subscription_key_file:
            return Path(self.fhir.subscription_key_file).expanduser().resolve()
        return self.storage.data_path / "secrets" / "subscription.key"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)


class ConfigError(Exception):
    """The configuration cannot be used; the message says what to fix."""


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from defaults, a TOML file (optional) and the environment."""
    path = config_file or os.environ.get("MEDGEMMA_NODE_CONFIG") or None
    toml_path: Path | None = None
    if path:
        toml_path = Path(path)
        if not toml_path.is_file():
            raise ConfigError(f"configuration file {toml_path} does not exist")

    class _FileSettings(Settings):
        toml_file = toml_path

    try:
        loaded = _FileSettings(**overrides)
    except Exception as exc:  # pydantic ValidationError or TOML syntax error
        where = f" in {toml_path}" if toml_path else ""
        raise ConfigError(f"invalid configuration{where}: {exc}") from exc
    return loaded


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests override by calling load_settings directly)."""
    return load_settings()
