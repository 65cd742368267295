"""The pre-read of one study version, as a plain function (tested without a broker)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

from node.ledger import LedgerError, StudyLedger
from node.settings import Settings

log = logging.getLogger("medgemma.preread")


class TransientPrereadError(Exception):
    """Worth retrying (engine busy, GPU out of memory under load)."""


@lru_cache(maxsize=4)
def _ledger(url: str) -> StudyLedger:
    return StudyLedger(url)


def ledger_for(settings: Settings) -> StudyLedger:
    return _ledger(settings.storage.resolved_database_url())


def run_preread(settings: Settings, study_uid: str, version: int) -> str:
    """Run the pre-read of a study version and record the outcome in the ledger.

    Returns the final state ("done", "failed") or "noop" when there was nothing to do.
    """
    ledger = ledger_for(settings)
    try:
        started = ledger.start_run(study_uid, version)
    except LedgerError as exc:
        log.warning("pre-read of %s v%d not started: %s", study_uid, version, exc)
        return "noop"
    if started is None:
        log.info("study %s v%d already finished: nothing to do", study_uid, version)
        return "noop"
    log.info("pre-read of study %s v%d started", study_uid, version)
    instances = ledger.instances_of(study_uid, up_to_version=version)
    result = {"instances": len(instances)}
    ledger.finish(study_uid, version, ok=True, reason="", result=result)
    log.info("pre-read of study %s v%d done", study_uid, version)
    return "done"


def fail_study(settings: Settings, study_uid: str, version: int, reason: str) -> None:
    try:
        ledger_for(settings).finish(study_uid, version, ok=False, reason=reason)
    except LedgerError as exc:
        log.warning("could not mark %s v%d failed: %s", study_uid, version, exc)


def run_preread_by_uid(settings: Settings) -> Callable[[str, int], str]:
    """The in-process worker's entry point (``serve``): bound to the node's settings."""

    def handler(study_uid: str, version: int) -> str:
        return run_preread(settings, study_uid, version)

    return handler
