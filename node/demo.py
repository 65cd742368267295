"""`medgemma-node demo`: a bundled synthetic chest study through the whole loop, in one process.

Starts a node on embedded defaults with the ``demo`` engine (non-clinical, labelled so),
sends a synthetic two-view chest study to it over DICOM (C-STORE, like a modality), waits
for the pre-read and prints where everything is.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts

from node.ledger import StudyState, StudySummary
from node.runtime import NodeRuntime
from node.settings import Settings, load_settings
from node.synthetic import make_two_view_study


class DemoError(Exception):
    pass


@dataclass(frozen=True)
class DemoOutcome:
    study: StudySummary
    spool_dir: Path
    data_dir: Path
    seconds: float


def send_datasets(host: str, port: int, called_ae: str, datasets: list[Dataset]) -> list[int]:
    """C-STORE datasets over one association; returns the status of each."""
    ae = AE(ae_title="MEDGEMMA-DEMO")
    ae.requested_contexts = StoragePresentationContexts[:127]
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DemoError(f"could not associate with {called_ae} at {host}:{port}")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def demo_settings(data_dir: Path, port: int) -> Settings:
    """Embedded defaults, the demo engine, loopback only, a short quiet period."""
    os.environ.setdefault("MEDGEMMA_NODE_ENGINE__NAME", "demo")
    return load_settings(
        None,
        dicom={"bind_address": "127.0.0.1", "port": port},
        storage={"data_dir": str(data_dir)},
        completion={"quiet_seconds": 1.0, "poll_seconds": 0.2},
        queue={"broker_url": ""},
    )


def run_demo(settings: Settings, timeout: float = 300.0, seed: int = 7) -> DemoOutcome:
    started = time.monotonic()
    runtime = NodeRuntime(settings, embedded=True)
    try:
        _, port = runtime.start()
        images = make_two_view_study(seed=seed)
        statuses = send_datasets(
            "127.0.0.1", port, settings.dicom.ae_title, [i.dataset for i in images]
        )
        if any(s != 0 for s in statuses):
            raise DemoError(f"the node refused the demo study: statuses {statuses}")
        uid = str(images[0].dataset.StudyInstanceUID)
        deadline = time.monotonic() + timeout
        while True:
            study = runtime.ledger.get_study(uid)
            if study is not None and study.state in (
                StudyState.DONE,
                StudyState.FAILED,
                StudyState.SKIPPED,
            ):
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"study {uid} not finished after {timeout:.0f}s "
                    f"(state {study.state.value if study else 'absent'})"
                )
            time.sleep(0.2)
        return DemoOutcome(
            study=study,
            spool_dir=runtime.spool.root / uid,
            data_dir=settings.storage.data_path,
            seconds=time.monotonic() - started,
        )
    finally:
        runtime.stop()
