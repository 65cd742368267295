"""Thin Celery tasks: they take ids, call plain functions, and say which errors are transient."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from node.settings import get_settings
from workers.celery_app import app
from workers.dialogue.turn import TransientTurnError
from workers.followup import fail_followup, run_followup
from workers.preread import TransientPrereadError, fail_study, run_preread

log = logging.getLogger("medgemma.tasks")


@app.task(
    name="medgemma.preread",
    bind=True,
    acks_late=True,
    autoretry_for=(TransientPrereadError,),
    retry_backoff=5,
    retry_backoff_max=120,
    max_retries=3,
)
def preread(self: object, study_uid: str, version: int) -> str:
    """Pre-read one study version, with up to ``queue.max_batch - 1`` other queued studies as
    one engine batch; idempotent (a finished study, or one a batch holds, is not redone).

    At the soft time limit this study is failed; the batch's others stop being renewed and
    the reconciler re-sends them once their leases run out."""
    try:
        return run_preread(get_settings(), study_uid, int(version))
    except SoftTimeLimitExceeded:
        fail_study(get_settings(), study_uid, int(version), "timed out in the worker")
        return "failed"


FOLLOWUP_RETRIES = 3


@app.task(name="medgemma.followup", bind=True, acks_late=True)
def followup(self: Task, question_id: str, route: str = "") -> str:
    """Answer one follow-up question; idempotent (an answered question is not redone).

    route: the worker the node sent it to ("" = the shared queue); a message whose route
    is no longer the question's (re-sent to the shared queue since) does nothing.
    A busy engine is retried with backoff, then the question is answered not-done."""
    try:
        return run_followup(get_settings(), str(question_id), route=str(route))
    except TransientTurnError as exc:
        if self.request.retries >= FOLLOWUP_RETRIES:
            fail_followup(
                get_settings(), str(question_id), "the model kept failing (transient errors)"
            )
            return "failed"
        raise self.retry(exc=exc, countdown=min(120, 5 * 2**self.request.retries)) from exc
    except SoftTimeLimitExceeded:
        fail_followup(get_settings(), str(question_id), "timed out in the worker")
        return "failed"
