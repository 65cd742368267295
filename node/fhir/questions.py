"""Follow-up questions, the API side: accept, queue, wait (or not), answer.

A question arrives as ``POST /fhir/DiagnosticReport/{id}/$ask`` (Parameters: ``question``,
optional ``anchor``, optional ``language``) or as ``POST /fhir/Communication`` (``about``
the DiagnosticReport, ``payload.contentString`` the question). Either way it is stored as
a question Communication together with a queued follow-up job (new questions are
committed in groups: :class:`node.fhir.followups.QuestionWriter`), then sent by name to the
``followup`` queue (task ``medgemma.followup``, or the in-process worker in ``serve``) by
:class:`node.fhir.followups.FollowupPublisher`, which retries through a broker outage: a
stored question is never refused or lost because the queue is down, only answered later.

``$ask`` is asynchronous by default, the FHIR way: 202 Accepted with ``Content-Location``
to poll (``GET /fhir/_async/{id}``: 202 while queued or running, then 200 with a collection
Bundle). ``Prefer: respond-sync`` waits up to ``fhir.respond_sync_timeout_seconds`` (or a
shorter ``wait=N``) and answers 200 with the Bundle, or 202 if the answer is not ready.

``POST Communication`` is a FHIR create (:func:`create_question`): 201 Created with the
question Communication, ``Location`` (its version 1), ``ETag`` and ``Content-Location``,
the body as ``Prefer: return=`` asks (``representation``, the default; ``minimal``: no
body; ``OperationOutcome``: how to find the answer). The answer is a Communication
``inResponseTo`` the question (``Communication?in-response-to=Communication/{id}``, or a
Subscription). ``Prefer: respond-sync`` keeps its meaning there in a create's terms: the
201 waits for the answer (up to the same timeout), so the question comes back
``completed`` and its answer is there to search at once; it is never a Bundle.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from fastapi import Request, Response

from node.fhir import codes
from node.fhir.auth import Principal
from node.fhir.deps import ApiContext, Call, base_url
from node.fhir.errors import FhirError, bad_request, not_found, operation_outcome, unprocessable
from node.fhir.followups import FollowupJob, NewQuestion, followup, study_uid_of
from node.fhir.resources import ResourceInvalid, now_instant, validate
from node.fhir.responses import FhirResponse, collection_text, json_response, resource_response
from node.fhir.search import normalise_reference
from node.fhir.store import FhirStore, StoredResource, new_id
from sr_templates import ontology

MAX_QUESTION_CHARS: Final = 4000
_LANGUAGE: Final = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")
_ANCHOR_ID: Final = re.compile(r"^A\d{1,4}$")
READY_STATUSES: Final = ("preliminary", "amended", "final", "corrected", "appended")


@dataclass(frozen=True)
class Question:
    text: str
    anchor: str  # "" | "A1" | "Observation/<id>"
    language: str  # "" | BCP-47 code


def _check_language(value: str) -> str:
    if value and not _LANGUAGE.match(value):
        raise bad_request(f"language {value[:40]!r} is not a language code (e.g. en, zh, zh-CN)")
    if value and ontology.answer_language(value) is None:
        supported = ", ".join(ontology.ANSWER_LANGUAGES)
        raise unprocessable(
            f"language {value!r} is not supported: follow-up answers are written in "
            f"{supported} (zh: Simplified Chinese, e.g. zh-CN)"
        )
    return value


def _check_text(text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise unprocessable("the question is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise unprocessable(f"the question is longer than {MAX_QUESTION_CHARS} characters")
    return text.strip()


#: The elements of a ``$ask`` parameter in the plain shape (one value each).
_PLAIN_VALUES: Final = {
    "question": ("valueString",),
    "anchor": ("valueString", "valueReference"),
    "language": ("valueCode", "valueString"),
}


def _plain_string(value: object) -> bool:
    # a FHIR string holds a character that is not white space (Python's str.isspace covers
    # every character the model's pattern counts as one, and a few more)
    return isinstance(value, str) and bool(value.strip())


def plain_ask_parameters(params: Mapping[str, Any]) -> bool:
    """Whether a ``$ask`` body is in the plain shape that needs no fhir.resources model:
    ``resourceType`` and a non-empty ``parameter`` list only, each parameter a ``name``
    (question, anchor, language) and one value of a type listed for it, strings with
    text, a Reference with a ``reference`` only, a code that is a language tag.

    Every such body is a valid Parameters resource (tests check it against the model), so
    skipping the model accepts nothing it would refuse; any other body is validated by the
    model as before (an extension, ``meta``, a second value, an empty string...), so what
    it refuses is refused with the same OperationOutcome. What the model allows but $ask
    does not (unknown or repeated parameters, a missing question, a long or blank one, an
    unsupported language) :func:`question_from_parameters` refuses either way."""
    if params.keys() != {"resourceType", "parameter"}:
        return False
    items = params["parameter"]
    if not isinstance(items, list) or not items:
        return False
    for p in items:
        if not isinstance(p, dict) or len(p) != 2:
            return False
        allowed = _PLAIN_VALUES.get(p.get("name"))  # type: ignore[arg-type]
        if allowed is None:
            return False
        kind = next((k for k in p if k != "name"), "")
        if kind not in allowed:
            return False
        value = p[kind]
        if kind == "valueReference":
            if not isinstance(value, dict) or value.keys() != {"reference"}:
                return False
            value = value["reference"]
        elif kind == "valueCode" and not (isinstance(value, str) and _LANGUAGE.match(value)):
            return False
        if not _plain_string(value):
            return False
    return True


def question_from_parameters(params: Mapping[str, Any]) -> Question:
    """The question of a ``$ask`` Parameters resource (400/422 when it is not usable)."""
    text: str | None = None
    anchor = ""
    language = ""
    seen: set[str] = set()
    for p in params.get("parameter", []):
        name = p.get("name")
        if name in seen:
            raise bad_request(f"parameter {name!r} of $ask may be given once")
        seen.add(str(name))
        if name == "question":
            text = p.get("valueString")
            if text is None:
                raise bad_request("parameter 'question' must be a valueString")
        elif name == "anchor":
            ref = p.get("valueReference")
            if isinstance(ref, dict) and ref.get("reference"):
                anchor = normalise_reference(str(ref["reference"]))
            elif p.get("valueString"):
                anchor = str(p["valueString"]).strip()
            else:
                raise bad_request("parameter 'anchor' must be a valueReference or valueString")
        elif name == "language":
            language = _check_language(str(p.get("valueCode") or p.get("valueString") or ""))
        else:
            raise bad_request(
                f"unknown parameter {name!r} for $ask; supported: question, anchor, language"
            )
    if text is None:
        raise bad_request("$ask needs the parameter 'question' (valueString)")
    return Question(_check_text(text), anchor, language)


def question_from_communication(comm: Mapping[str, Any]) -> tuple[str, Question]:
    """(report id, question) of a Communication a client posts."""
    reports = []
    anchor = ""
    for ref in comm.get("about", []):
        target = normalise_reference(str(ref.get("reference", "")))
        kind, _, rid = target.partition("/")
        if kind == "DiagnosticReport" and rid:
            reports.append(rid)
        elif kind == "Observation" and rid and not anchor:
            anchor = target
    if len(reports) != 1:
        raise unprocessable(
            "Communication.about must reference exactly one DiagnosticReport (the pre-read "
            "the question is about)"
        )
    payloads = [p.get("contentString") for p in comm.get("payload", []) if "contentString" in p]
    if not payloads:
        raise unprocessable("Communication.payload.contentString must hold the question")
    language = _check_language(str(comm.get("language") or ""))
    return reports[0], Question(_check_text(payloads[0]), anchor, language)


def _report_and_study(store: FhirStore, report_id: str) -> tuple[StoredResource, str]:
    """The report a question is about and its Study Instance UID, by which the question is
    routed to the worker that holds the study's image work (docs/architecture.md)."""
    report = _report(store, report_id)
    return report, study_uid_of(store, report)


def _report(store: FhirStore, report_id: str) -> StoredResource:
    if not re.match(r"^[A-Za-z0-9\-\.]{1,64}$", report_id):
        raise bad_request(f"{report_id[:80]!r} is not a FHIR id")
    report = store.get("DiagnosticReport", report_id)
    if report is None:
        raise not_found(f"DiagnosticReport/{report_id} is not known")
    status = report.resource.get("status")
    if status not in READY_STATUSES:
        raise unprocessable(
            f"DiagnosticReport/{report_id} is {status}: questions can be asked once the "
            "pre-read is preliminary"
        )
    return report


def _resolve_anchor(store: FhirStore, report: StoredResource, anchor: str) -> str:
    """The anchor as "Observation/<id>" of the report; 422 when the report has no such one."""
    if not anchor:
        return ""
    results = [normalise_reference(r["reference"]) for r in report.resource.get("result", [])]
    if anchor.startswith("Observation/"):
        if anchor not in results:
            raise unprocessable(f"{anchor} is not a finding of DiagnosticReport/{report.id}")
        return anchor
    observations = store.get_many(tuple(r.split("/", 1)) for r in results)  # type: ignore[misc]
    names = []
    for obs in observations:
        for ident in obs.resource.get("identifier", []):
            value = str(ident.get("value", ""))
            if _ANCHOR_ID.match(value):
                names.append(value)
            if value in (anchor, f"urn:oid:{anchor}") or value.upper() == anchor.upper():
                return f"Observation/{obs.id}"
    raise unprocessable(
        f"DiagnosticReport/{report.id} has no anchor {anchor[:40]!r}"
        + (f"; its anchors: {', '.join(sorted(names))}" if names else "")
    )


def build_question(
    report: StoredResource,
    q: Question,
    anchor_ref: str,
    principal: Principal,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The question Communication as stored (a client's own elements kept when given)."""
    comm: dict[str, Any] = dict(extra or {})
    comm.pop("meta", None)
    comm.update(resourceType="Communication", id=new_id(), status="in-progress")
    categories = [c for c in comm.get("category", []) if c != codes.COMMUNICATION_QUESTION]
    comm["category"] = [codes.COMMUNICATION_QUESTION, *categories]
    about = [{"reference": f"DiagnosticReport/{report.id}"}]
    if anchor_ref:
        about.append({"reference": anchor_ref})
    comm["about"] = about
    if report.resource.get("subject"):
        comm["subject"] = report.resource["subject"]
    comm.setdefault("sent", now_instant())
    comm.setdefault("sender", {"display": principal.name})
    comm["payload"] = [{"contentString": q.text}]
    if q.language:
        comm["language"] = q.language
    if not extra:  # built here from checked parts only ($ask): nothing a client shaped
        return comm
    try:
        return validate(comm)
    except ResourceInvalid as exc:
        raise bad_request(str(exc)) from None


ReturnPreference = Literal["representation", "minimal", "operationoutcome"]


def _prefer_tokens(request: Request) -> list[str]:
    """The Prefer header's preferences and parameters, lower case, quotes dropped."""
    prefer = request.headers.get("prefer", "").lower()
    return [t.strip().replace('"', "") for t in prefer.replace(";", ",").split(",")]


def return_preference(request: Request) -> ReturnPreference:
    """What the body of a create holds (Prefer: return=...; representation by default, and
    for a value FHIR does not define: an unknown preference is ignored, RFC 7240)."""
    for token in _prefer_tokens(request):
        if token in ("return=minimal", "return=operationoutcome"):
            return "minimal" if token == "return=minimal" else "operationoutcome"
    return "representation"


def preference(request: Request, cap: float) -> float | None:
    """Seconds to wait for the answer (Prefer: respond-sync[, wait=N]); None = async."""
    tokens = _prefer_tokens(request)
    if "respond-sync" not in tokens:
        return None
    for t in tokens:
        if t.startswith("wait="):
            try:
                return max(0.0, min(cap, float(t[5:])))
            except ValueError:
                raise bad_request(f"Prefer wait={t[5:]!r} is not a number of seconds") from None
    return cap


async def wait_for(ctx: ApiContext, job_id: str, timeout: float) -> FollowupJob | None:
    """Poll the job until it is finished or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        job = await ctx.db(followup, ctx.store, job_id)
        remaining = deadline - time.monotonic()
        if job is None or job.finished or remaining <= 0:
            return job
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 0.25)


def result_resources(store: FhirStore, job: FollowupJob) -> list[StoredResource]:
    """The answer Communication, then what it is about (the report, the anchors'
    Observations: new or amended ones in their current versions)."""
    answer = store.get("Communication", job.answer_id)
    if answer is None:
        return []
    about = [normalise_reference(a["reference"]) for a in answer.resource.get("about", [])]
    pairs: Sequence[tuple[str, str]] = [
        (t, i) for t, _, i in (ref.partition("/") for ref in about) if i
    ]
    return [answer, *store.get_many(pairs)]


def job_response(request: Request, call: Call, job: FollowupJob) -> Response:
    """202 + Content-Location while the job runs; 200 + the result Bundle when it is done
    (blocking: call it in a database thread)."""
    base = base_url(request, call.settings)
    location = f"{base}/_async/{job.id}"
    if not job.finished:
        outcome = operation_outcome(
            f"the question (Communication/{job.id}) is {job.state.value}; poll Content-Location",
            code="informational",
            severity="information",
        )
        return json_response(
            outcome,
            status=202,
            headers={
                "Content-Location": location,
                "X-Progress": job.state.value,
                "Retry-After": "1",
            },
        )
    disclosed = call.readable(result_resources(call.store, job))  # scope-checked like reads
    call.access.returned(disclosed.resources)
    headers = {"Content-Location": location}
    if job.answer_id:
        headers["Location"] = f"{base}/Communication/{job.answer_id}"
    text = collection_text(base, disclosed.resources, disclosed.warning)
    return json_response(text, status=200, headers=headers)


async def _accept(
    request: Request,
    call: Call,
    report_id: str,
    q: Question,
    extra: Mapping[str, Any] | None = None,
) -> FollowupJob:
    """Store and queue a question about a report; wait for its answer when Prefer asks to."""
    ctx = call.ctx
    assert call.principal is not None
    wait = preference(request, call.settings.respond_sync_timeout_seconds)
    if ctx.writer is None or ctx.publisher is None:
        raise FhirError(
            503, "this node has no work queue for follow-up questions", code="transient"
        )
    report, study_uid = await ctx.read(_report_and_study, ctx.store, report_id)
    anchor_ref = await ctx.read(_resolve_anchor, ctx.store, report, q.anchor)
    question = build_question(report, q, anchor_ref, call.principal, extra)
    item = NewQuestion(question, report.id, study_uid, q.language, anchor_ref)
    job = await asyncio.wrap_future(ctx.writer.submit(item))
    ctx.publisher.publish(job.id)
    call.access.entities = [f"DiagnosticReport/{job.report_id}", f"Communication/{job.id}"]
    if wait is not None and wait > 0:
        waited = await wait_for(ctx, job.id, wait)
        if waited is not None:
            job = waited
    return job


async def ask(
    request: Request,
    call: Call,
    report_id: str,
    q: Question,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    """``$ask``: store + queue, then answer sync (the Bundle) or async (202 + poll)."""
    job = await _accept(request, call, report_id, q, extra)
    if not job.finished:  # no database work left: answer from here
        return job_response(request, call, job)
    return await call.ctx.db(job_response, request, call, job)


def _stored_question(store: FhirStore, question_id: str) -> StoredResource:
    stored = store.get("Communication", question_id)
    if stored is None:  # only if deleted in between: the create still happened
        raise not_found(f"Communication/{question_id} is gone")
    return stored


async def create_question(
    request: Request, call: Call, report_id: str, q: Question, extra: Mapping[str, Any]
) -> Response:
    """``POST Communication``: 201 Created with the question (as Prefer: return= asks),
    Location of its first version and ETag of the version served."""
    returning = return_preference(request)
    job = await _accept(request, call, report_id, q, extra)
    stored = await call.ctx.read(_stored_question, call.ctx.store, job.id)
    base = base_url(request, call.settings)
    url = f"{base}/Communication/{stored.id}"
    headers = {"Location": f"{url}/_history/1", "ETag": stored.etag}
    if returning == "minimal":
        return FhirResponse(content=b"", status_code=201, headers=headers)
    if returning == "operationoutcome":
        outcome = operation_outcome(
            f"Communication/{stored.id} created ({job.state.value}); its answer will be a "
            f"Communication found by GET {base}/Communication?in-response-to="
            f"Communication/{stored.id}",
            code="informational",
            severity="information",
        )
        return json_response(outcome, status=201, headers=headers)
    response = resource_response(stored, 201, base=base)
    response.headers["Location"] = headers["Location"]  # the created version
    response.headers["Content-Location"] = f"{url}/_history/{stored.version_id}"  # the body's
    return response
