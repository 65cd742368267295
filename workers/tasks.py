"""Thin Celery tasks: they take ids, call plain functions, and say which errors are transient."""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded

from node.settings import get_settings
from workers.celery_app import app
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
    """Pre-read one study version; idempotent (a finished study is not redone)."""
    try:
        return run_preread(get_settings(), study_uid, int(version))
    except SoftTimeLimitExceeded:
        fail_study(get_settings(), study_uid, int(version), "timed out in the worker")
        return "failed"


@app.task(name="medgemma.followup", bind=True, acks_late=True)
def followup(self: object, question_id: str) -> str:
    """Answer one follow-up question; idempotent (an answered question is not redone)."""
    try:
        return run_followup(get_settings(), str(question_id))
    except SoftTimeLimitExceeded:
        fail_followup(get_settings(), str(question_id), "timed out in the worker")
        return "failed"
