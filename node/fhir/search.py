"""Search parameters: what each resource type can be searched by, and how.

One registry (:data:`SEARCH_PARAMS`) drives everything: the values written to the search
index when a resource is stored (:func:`index_values`), the parsing of a query string
(:func:`parse_query`), the SQL of a search, Subscription criteria, the OpenAPI parameters
and the CapabilityStatement. A parameter, modifier or prefix not in the registry is a
400 with the list of what is supported (``Prefer: handling=lenient`` ignores unknown
parameters instead).

Subjects are identifier references (the node keeps no Patient resources), so
``subject:identifier`` / ``patient:identifier`` and the chains ``subject.identifier`` /
``patient.identifier`` all search the subject reference's identifier, and
``subject=Patient/[id]`` / ``patient=[id]`` match the subjects whose identifier value
(DICOM PatientID, any system) is ``[id]``; a subject of another type is a 400.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from node.fhir.errors import bad_request

ParamType = Literal["token", "reference", "date", "special"]

#: Result parameters (not filters) a search accepts. ``_cursor`` is the server's own paging
#: token (in next links): the snapshot time and the last resource seen (:class:`Cursor`).
CONTROL_PARAMS: Final = (
    "_count", "_offset", "_format", "_include", "_revinclude", "_sort", "_summary", "_cursor",
)  # fmt: skip

#: ``_sort`` keys: a search parameter of type date, or ``_lastUpdated``; ``-`` = descending.
SORT_KEYS: Final = ("_lastUpdated", "date")


@dataclass(frozen=True)
class IndexValue:
    """One value of one search parameter of a stored resource."""

    param: str
    system: str = ""
    value: str = ""
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class SearchParam:
    """A search parameter: the query key(s), its type and the index it reads."""

    name: str  # as listed in the CapabilityStatement
    type: ParamType
    index: str  # the index param name ("_id" reads the resource id)
    documentation: str
    aliases: tuple[str, ...] = ()  # other query keys (modifier or chain forms)
    standard: bool = True  # defined by FHIR R4 for this resource type


@dataclass(frozen=True)
class Condition:
    """One query key: any of ``alternatives`` matches (comma = OR; repeated keys = AND)."""

    param: SearchParam
    alternatives: tuple[tuple[str, str, str], ...]  # (prefix or system, value, kind)


#: The index of the subject's identifier; ``subject`` and ``patient`` references read it.
SUBJECT_IDENTIFIER: Final = "subject-identifier"


def _subject_params() -> list[SearchParam]:
    return [
        SearchParam(
            "subject",
            "reference",
            SUBJECT_IDENTIFIER,
            "The patient as Patient/[id], where [id] is the patient's identifier value "
            "(DICOM PatientID): the node keeps no Patient resources, its subjects are "
            "identifier references; subject:identifier takes a system too",
        ),
        SearchParam(
            "patient",
            "reference",
            SUBJECT_IDENTIFIER,
            "Same as subject (Patient/[id], [id] the DICOM PatientID)",
        ),
        SearchParam(
            "subject:identifier",
            "token",
            SUBJECT_IDENTIFIER,
            "The patient's identifier (DICOM PatientID), [system]|[value]; also as "
            "patient:identifier, patient.identifier and subject.identifier",
            aliases=("patient:identifier", "patient.identifier", "subject.identifier"),
        ),
    ]


_COMMON = [
    SearchParam("_id", "special", "_id", "Logical id of the resource"),
    SearchParam("_lastUpdated", "date", "_lastUpdated",
                "When the resource last changed (meta.lastUpdated); eq/ge/le/gt/lt"),
]  # fmt: skip

SEARCH_PARAMS: Final[dict[str, dict[str, SearchParam]]] = {}


def _register(resource_type: str, params: Iterable[SearchParam]) -> None:
    table: dict[str, SearchParam] = {}
    for p in [*_COMMON, *params]:
        table[p.name] = p
        for alias in p.aliases:
            table[alias] = p
    SEARCH_PARAMS[resource_type] = table


_register(
    "DiagnosticReport",
    [
        SearchParam("identifier", "token", "identifier",
                    "A report identifier or the accession number, [system]|[value]"),
        SearchParam("status", "token", "status",
                    "registered | preliminary | amended | cancelled"),
        SearchParam("date", "date", "date", "The study date (effectiveDateTime); eq/ge/le/gt/lt"),
        SearchParam("code", "token", "code", "The report code (LOINC 30745-4)"),
        SearchParam("category", "token", "category", "The report category (v2-0074 RAD)"),
        SearchParam("based-on", "reference", "based-on",
                    "The order as a reference; the node's basedOn is an identifier reference "
                    "(the accession number): use based-on:identifier",
                    aliases=()),
        SearchParam("based-on:identifier", "token", "based-on-identifier",
                    "The order's identifier (accession number), [system]|[value]"),
        SearchParam("result", "reference", "result", "An Observation of the report"),
        SearchParam("imaging-study", "reference", "imaging-study", "The ImagingStudy read",
                    standard=False),
        *_subject_params(),
    ],
)  # fmt: skip
_register(
    "Observation",
    [
        SearchParam("identifier", "token", "identifier",
                    "The anchor's tracking UID (urn:dicom:uid|urn:oid:...) or anchor id"),
        SearchParam("status", "token", "status", "preliminary | amended"),
        SearchParam("code", "token", "code", "The finding code, [system]|[code]"),
        SearchParam("derived-from", "reference", "derived-from",
                    "The ImagingStudy the finding was read from (ImagingStudy/[id])"),
        SearchParam("device", "reference", "device", "The model Device"),
        *_subject_params(),
    ],
)  # fmt: skip
_register(
    "ImagingStudy",
    [
        SearchParam("identifier", "token", "identifier",
                    "Study Instance UID (urn:dicom:uid|urn:oid:[uid]) or accession number"),
        SearchParam("status", "token", "status", "registered | available"),
        SearchParam("started", "date", "started", "The study date"),
        *_subject_params(),
    ],
)  # fmt: skip
_register(
    "Communication",
    [
        SearchParam("status", "token", "status", "in-progress | completed | not-done"),
        SearchParam("category", "token", "category", "question | answer"),
        SearchParam("sent", "date", "sent", "When the communication was sent"),
        SearchParam("about", "reference", "about",
                    "A resource the communication is about (DiagnosticReport/[id])",
                    standard=False),
        SearchParam("in-response-to", "reference", "in-response-to",
                    "The question an answer responds to (Communication/[id])", standard=False),
        *_subject_params(),
    ],
)  # fmt: skip
_register(
    "Subscription",
    [
        SearchParam("status", "token", "status", "requested | active | error | off"),
        SearchParam("type", "token", "type", "rest-hook"),
    ],
)
_register(
    "AuditEvent",
    [
        SearchParam("date", "date", "date", "When the access was recorded"),
        SearchParam("action", "token", "action", "C | R | U | D | E"),
        SearchParam("outcome", "token", "outcome", "0 | 4 | 8 | 12"),
        SearchParam("agent:identifier", "token", "agent-identifier",
                    "Who accessed (token name or JWT subject)"),
        SearchParam("entity", "reference", "entity", "The resource accessed"),
        SearchParam("patient", "reference", SUBJECT_IDENTIFIER,
                    "The patient whose data was accessed, as Patient/[id] ([id] the DICOM "
                    "PatientID)"),
        SearchParam("patient:identifier", "token", SUBJECT_IDENTIFIER,
                    "The identifier (DICOM PatientID) of the patient whose data was accessed, "
                    "[system]|[value]; also as patient.identifier",
                    aliases=("patient.identifier",)),
    ],
)  # fmt: skip
_register(
    "Provenance",
    [SearchParam("target", "reference", "target", "The resource the provenance is about")],
)
_register("Device", [])


# --------------------------------------------------------------------------- index values


def _tokens(param: str, codings: Iterable[Mapping[str, Any]]) -> Iterator[IndexValue]:
    for c in codings:
        if c.get("code") is not None:
            yield IndexValue(param, str(c.get("system", "")), str(c["code"]))


def _concepts(param: str, concepts: Iterable[Mapping[str, Any]]) -> Iterator[IndexValue]:
    for cc in concepts:
        yield from _tokens(param, cc.get("coding", []))


def _identifiers(param: str, identifiers: Iterable[Mapping[str, Any]]) -> Iterator[IndexValue]:
    for i in identifiers:
        if i.get("value"):
            yield IndexValue(param, str(i.get("system", "")), str(i["value"]))


def _references(
    param: str, refs: Iterable[Mapping[str, Any]], identifier_param: str | None = None
) -> Iterator[IndexValue]:
    for r in refs:
        if r.get("reference"):
            yield IndexValue(param, "", normalise_reference(str(r["reference"])))
        if identifier_param and isinstance(r.get("identifier"), dict):
            yield from _identifiers(identifier_param, [r["identifier"]])


_DATETIME: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?"
)


def date_range(text: str) -> tuple[datetime, datetime]:
    """The [start, end) range a FHIR date, dateTime or instant stands for (naive UTC).

    ValueError for a text that is not one (or lies outside years 1-9998).
    """
    try:
        return _date_range(text)
    except OverflowError:
        raise ValueError(f"date {text!r} is out of range") from None


def _date_range(text: str) -> tuple[datetime, datetime]:
    t = text.strip()
    m = re.fullmatch(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", t)
    if m:
        year, month, day = int(m[1]), int(m[2] or 1), int(m[3] or 1)
        start = datetime(year, month, day)
        if m[3]:
            return start, start + timedelta(days=1)
        if m[2]:
            return start, datetime(year + (month == 12), month % 12 + 1, 1)
        return start, datetime(year + 1, 1, 1)
    if not _DATETIME.fullmatch(t):
        raise ValueError(f"{t!r} is not a FHIR date or dateTime")
    parsed = datetime.fromisoformat(t.replace("Z", "+00:00"))
    if parsed.tzinfo is not None:
        offset = parsed.utcoffset() or timedelta(0)
        parsed = (parsed - offset).replace(tzinfo=None)
    # seconds precision: the whole second
    return parsed, parsed + timedelta(seconds=1)


def _date(param: str, text: Any) -> Iterator[IndexValue]:
    if isinstance(text, str) and text:
        try:
            start, end = date_range(text)
        except ValueError:
            return
        yield IndexValue(param, start=start, end=end)


def _subject(resource: Mapping[str, Any]) -> Iterator[IndexValue]:
    subject = resource.get("subject")
    if isinstance(subject, dict):
        yield from _references("subject", [subject], SUBJECT_IDENTIFIER)


def _status(resource: Mapping[str, Any]) -> Iterator[IndexValue]:
    if resource.get("status"):
        yield IndexValue("status", "", str(resource["status"]))


def _report_values(r: Mapping[str, Any]) -> Iterator[IndexValue]:
    yield from _identifiers("identifier", r.get("identifier", []))
    yield from _status(r)
    yield from _date("date", r.get("effectiveDateTime"))
    yield from _concepts("code", [r.get("code", {})])
    yield from _concepts("category", r.get("category", []))
    yield from _references("based-on", r.get("basedOn", []), "based-on-identifier")
    yield from _references("result", r.get("result", []))
    yield from _references("imaging-study", r.get("imagingStudy", []))
    yield from _subject(r)


def _observation_values(r: Mapping[str, Any]) -> Iterator[IndexValue]:
    yield from _identifiers("identifier", r.get("identifier", []))
    yield from _status(r)
    yield from _concepts("code", [r.get("code", {})])
    yield from _references("derived-from", r.get("derivedFrom", []))
    if isinstance(r.get("device"), dict):
        yield from _references("device", [r["device"]])
    yield from _subject(r)


def _study_values(r: Mapping[str, Any]) -> Iterator[IndexValue]:
    yield from _identifiers("identifier", r.get("identifier", []))
    yield from _status(r)
    yield from _date("started", r.get("started"))
    yield from _subject(r)


def _communication_values(r: Mapping[str, Any]) -> Iterator[IndexValue]:
    yield from _status(r)
    yield from _concepts("category", r.get("category", []))
    yield from _date("sent", r.get("sent"))
    yield from _references("about", r.get("about", []))
    yield from _references("in-response-to", r.get("inResponseTo", []))
    yield from _subject(r)


def _subscription_values(r: Mapping[str, Any]) -> Iterator[IndexValue]:
    yield from _status(r)
    channel = r.get("channel") or {}
    if channel.get("type"):
        yield IndexValue("type", "", str(channel["type"]))
    # meta.tag: the client that created it (the server's owner condition reads it)
    yield from _tokens("_tag", (r.get("meta") or {}).get("tag", []))


def _audit_values(r: Mapping[str, Any]) -> Iterator[IndexValue]:
    yield from _date("date", r.get("recorded"))
    if r.get("action"):
        yield IndexValue("action", "", str(r["action"]))
    if r.get("outcome"):
        yield IndexValue("outcome", "", str(r["outcome"]))
    for agent in r.get("agent", []):
        who = agent.get("who") or {}
        if isinstance(who.get("identifier"), dict):
            yield from _identifiers("agent-identifier", [who["identifier"]])
    for entity in r.get("entity", []):
        if isinstance(entity.get("what"), dict):
            yield from _references("entity", [entity["what"]])
            if (entity.get("role") or {}).get("code") == "1":  # object-role 1: Patient
                what = entity["what"]
                if isinstance(what.get("identifier"), dict):
                    yield from _identifiers(SUBJECT_IDENTIFIER, [what["identifier"]])


def _provenance_values(r: Mapping[str, Any]) -> Iterator[IndexValue]:
    yield from _references("target", r.get("target", []))


_EXTRACTORS: Final[dict[str, Callable[[Mapping[str, Any]], Iterator[IndexValue]]]] = {
    "DiagnosticReport": _report_values,
    "Observation": _observation_values,
    "ImagingStudy": _study_values,
    "Communication": _communication_values,
    "Subscription": _subscription_values,
    "AuditEvent": _audit_values,
    "Provenance": _provenance_values,
}


def index_values(resource: Mapping[str, Any]) -> list[IndexValue]:
    """Every search parameter value of ``resource`` (what the search index keeps)."""
    extract = _EXTRACTORS.get(str(resource.get("resourceType")))
    return [] if extract is None else list(extract(resource))


# --------------------------------------------------------------------------- query parsing

_DATE_PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le")


def normalise_reference(text: str) -> str:
    """ "Type/id", from a relative or absolute reference (history suffix dropped)."""
    parts = [p for p in text.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else text


def _split_values(raw: str) -> list[str]:
    """Comma-separated alternatives ("\\," is a literal comma)."""
    out: list[str] = []
    current = ""
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            current += raw[i + 1]
            i += 2
            continue
        if ch == ",":
            out.append(current)
            current = ""
        else:
            current += ch
        i += 1
    out.append(current)
    return out


def supported_names(resource_type: str) -> list[str]:
    return sorted(SEARCH_PARAMS.get(resource_type, {}))


def parse_query(
    resource_type: str, items: Iterable[tuple[str, str]], *, lenient: bool = False
) -> list[Condition]:
    """The filter conditions of a query string; control parameters are skipped.

    Raises FhirError (400) for an unknown parameter or modifier, an empty value, or a
    value its type cannot take (a malformed date or prefix).
    """
    table = SEARCH_PARAMS.get(resource_type)
    if table is None:
        raise bad_request(f"{resource_type} cannot be searched")
    conditions: list[Condition] = []
    for key, raw in items:
        if key in CONTROL_PARAMS:
            continue
        param = table.get(key)
        if param is None:
            if lenient:
                continue
            raise bad_request(
                f"unknown search parameter {key!r} for {resource_type}; supported: "
                + ", ".join(supported_names(resource_type) + list(CONTROL_PARAMS))
            )
        alternatives = []
        for value in _split_values(raw):
            if not value:
                raise bad_request(f"search parameter {key!r} has an empty value")
            if len(value) > 512 or any(ord(ch) < 32 for ch in value):
                raise bad_request(
                    f"search parameter {key!r}: values are at most 512 characters, "
                    "without control characters"
                )
            alternatives.append(_parse_value(param, key, value))
        conditions.append(Condition(param, tuple(alternatives)))
    return conditions


def _parse_value(param: SearchParam, key: str, value: str) -> tuple[str, str, str]:
    if param.type == "date":
        prefix = value[:2] if value[:2] in _DATE_PREFIXES else "eq"
        text = value[2:] if value[:2] in _DATE_PREFIXES else value
        try:
            date_range(text)
        except ValueError:
            raise bad_request(
                f"search parameter {key!r}: {value!r} is not a FHIR date "
                "(YYYY, YYYY-MM, YYYY-MM-DD or a dateTime, optionally prefixed eq/ne/gt/lt/ge/le)"
            ) from None
        return prefix, text, "date"
    if param.type == "reference":
        if "|" in value:
            raise bad_request(
                f"search parameter {key!r} takes a reference ([type]/[id]); "
                f"for identifiers use {param.name}:identifier"
            )
        ref = normalise_reference(value)
        if param.index == SUBJECT_IDENTIFIER:
            return _patient_reference(key, ref)
        return ("", ref, "reference") if "/" in ref else ("", ref, "id")
    if param.type == "special":
        return "", value, "id"
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code, "system" if code else "system-only"
    return "", value, "any-system"


def _patient_reference(key: str, ref: str) -> tuple[str, str, str]:
    """``Patient/[id]`` (or ``[id]``) as the patient identifier value it names: the node's
    subjects are logical references by PatientID, so that is what a patient's id means."""
    kind, _, patient_id = ref.rpartition("/")
    if kind not in ("", "Patient"):
        raise bad_request(
            f"search parameter {key!r}: {ref[:80]!r} is not a Patient; this node's subjects "
            "are patients, searched as Patient/[DICOM PatientID] or "
            f"{key}:identifier=[system]|[PatientID]"
        )
    return "", patient_id, "any-system"


def parse_count(raw: str | None, default: int, maximum: int) -> int:
    """The page size from ``_count`` (0 = only the total), capped at ``maximum``."""
    if raw is None:
        return default
    if not raw.isdigit():
        raise bad_request(f"_count must be a non-negative integer, not {raw!r}")
    return min(int(raw), maximum)


def parse_offset(raw: str | None) -> int:
    if raw is None:
        return 0
    if not raw.isdigit() or int(raw) > 10**9:
        raise bad_request(f"_offset must be a non-negative integer, not {raw!r}")
    return int(raw)


def applied_items(resource_type: str, items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The query items a search applies (what its self link shows): known search
    parameters and result parameters; what ``Prefer: handling=lenient`` ignored is left out."""
    table = SEARCH_PARAMS.get(resource_type, {})
    return [(k, v) for k, v in items if k in CONTROL_PARAMS or k in table]


@dataclass(frozen=True)
class SortKey:
    """One ``_sort`` key: ``_lastUpdated`` or a date parameter's index name."""

    name: str
    descending: bool


def parse_sort(resource_type: str, raw: str | None) -> tuple[SortKey, ...]:
    """The ``_sort`` keys (comma-separated, ``-`` for descending); 400 for one this type
    cannot sort by. No ``_sort``: newest change first (``-_lastUpdated``)."""
    if raw is None:
        return (SortKey("_lastUpdated", True),)
    table = SEARCH_PARAMS.get(resource_type, {})
    allowed = [k for k in SORT_KEYS if k == "_lastUpdated" or k in table]
    keys = []
    for part in raw.split(","):
        name = part.strip().removeprefix("-")
        if name not in allowed:
            raise bad_request(
                f"_sort={part!r} is not supported for {resource_type}; supported: "
                + ", ".join(allowed)
                + " (prefix - for descending)"
            )
        keys.append(SortKey(table[name].index if name in table else name, part.startswith("-")))
    return tuple(keys)


def parse_summary(raw: str | None) -> bool:
    """True for ``_summary=count`` (only the total); ``false`` or none is a normal search."""
    if raw is None or raw == "false":
        return False
    if raw == "count":
        return True
    raise bad_request(f"_summary={raw!r} is not supported; supported: count, false")


@dataclass(frozen=True)
class Cursor:
    """Where the next page of a search starts: the snapshot bound (resources changed after
    the first page are left out, so pages neither repeat nor skip) and the sort values and
    row of the last resource served."""

    snapshot: datetime
    values: tuple[str | None, ...]  # ISO datetimes of the sort keys (None: no value)
    row: int

    def encode(self) -> str:
        data = [self.snapshot.isoformat(), list(self.values), self.row]
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, keys: int) -> Cursor:
        """400 for a token this server did not write (or written for another _sort)."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            snapshot, values, row = json.loads(raw)
            if not isinstance(row, int) or not isinstance(values, list) or len(values) != keys:
                raise ValueError("wrong shape")
            for v in values:
                if v is not None:
                    datetime.fromisoformat(v)
            return cls(datetime.fromisoformat(snapshot), tuple(values), row)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise bad_request(
                "_cursor is not a paging token of this search: follow the next link as given"
            ) from None


#: ``_revinclude`` values per searched type: ``[source type]:[its reference parameter]``,
#: the resources that point at a match (Provenance of what the model wrote; answers).
REVINCLUDES: Final[dict[str, tuple[str, ...]]] = {
    "DiagnosticReport": ("Provenance:target", "Communication:about"),
    "Observation": ("Provenance:target", "DiagnosticReport:result", "Communication:about"),
    "ImagingStudy": ("DiagnosticReport:imaging-study", "Observation:derived-from"),
    "Communication": ("Communication:in-response-to",),
}


def parse_revinclude(resource_type: str, value: str) -> tuple[str, str]:
    """(source type, index name) of one ``_revinclude`` value; 400 for one not supported."""
    supported = REVINCLUDES.get(resource_type, ())
    if value not in supported:
        raise bad_request(
            f"_revinclude={value!r} is not supported for {resource_type}; supported: "
            + (", ".join(supported) or "none")
        )
    source, _, name = value.partition(":")
    return source, SEARCH_PARAMS[source][name].index
