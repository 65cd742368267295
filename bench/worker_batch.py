"""Worker batching benchmark: studies/hour of the pre-read worker at ``queue.max_batch`` B,
against the engine alone on the same requests at the same batch size.

For each B (default 1, 8, 32) a fresh data directory gets ``--studies`` synthetic one-image
CR studies (spool files + ledger rows, queued oldest first, as the SCP and the completion
leave them). The worker then runs them as the Celery task and ``serve``'s embedded worker do:
``workers.preread.run_preread(settings, study, 1)`` for each study's message in queue
order, ``settings.queue.max_batch = B``. A task claims up to B - 1 other queued studies and
runs them as one engine batch; the claimed studies' own messages then return at once. The
run is timed from the first message to the last; every study must end ``done`` with its SR
file, else the benchmark stops with an error instead of a number.

The engine is the real transformers engine (``MedGemmaEngine``, the production load path)
on a random-weight Gemma 3 built locally by bench/tiny_gemma.py: NOT MedGemma, NOT a GPU.
Two changes make random weights measurable, both applied to the worker's requests and the
peer's alike: each request's text is the pre-read prompt cut to the length the real Gemma
tokenizer would give it (the bench tokenizer spends one token per character), and exactly
``--new-tokens`` tokens are generated (``min_new_tokens``), so random weights do not stop
early. Everything else (views, decode, LUTs, padding, chat template, image preprocessing,
parse, anchors, SR/SEG, ledger, FHIR) is the worker's own code.

Peer, measured in the same run: the engine alone on the batches the worker sent (the same
requests, batch sizes and order), replayed right after each worker run, so that each worker
run has its engine run next to it (ABAB). Reported per B: worker and engine studies/hour
(best of ``--repeats``), worker/engine as the median over those pairs, by wall time and by
this process's CPU time (1.00 = no overhead; torch runs ``--threads`` threads, default 1,
so CPU time moves much less than wall time with the machine's other load), the CPU
milliseconds per study of each, and the speed-up of B over the first B for both. Also kept
in the JSON: ``bench/gpu_preread.py``'s measurement of one batch of B (time to the first
token, decode rate) and the CPU the rest of the machine used during each worker run
("other load", cores).

Usage:
  python bench/worker_batch.py [--batch 1 8 32] [--studies 64] [--new-tokens 32]
      [--repeats 2] [--rows 1250 --cols 1024] [--threads 1] [--out bench/out/worker_batch.json]
  python bench/worker_batch.py --quick      # 16 studies, batches 1 4 16, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu_preread import default_prompt_tokens, measure_batch, preread_prompt  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A run that did not finish every study: no figure is reported."""


class ForcedEngine:
    """The engine with the bench's two changes (cut prompt text, exactly N new tokens);
    records every batch it is given, so the peer can run exactly those requests."""

    def __init__(self, engine: Any, new_tokens: int, system: str, prompt: str) -> None:
        self.engine = engine
        self.info = engine.info
        self.new_tokens = new_tokens
        self.system = system
        self.prompt = prompt
        self.batches: list[list[Any]] = []

    def generate(self, requests: list[Any]) -> list[str]:
        forced = [
            replace(r, system=self.system, prompt=self.prompt, max_new_tokens=self.new_tokens)
            for r in requests
        ]
        self.batches.append(forced)
        texts: list[str] = self.engine.generate(
            forced, generation_kwargs={"min_new_tokens": self.new_tokens}
        )
        return texts


def write_images(directory: Path, count: int, rows: int, cols: int) -> list[Path]:
    """``count`` one-image synthetic chest CR studies (one file each), made once."""
    from node.synthetic import make_chest_radiograph, write_study

    paths = []
    for i in range(count):
        image = make_chest_radiograph(seed=1000 + i, rows=rows, cols=cols)
        (path,) = write_study(directory / f"s{i:03d}", [image])
        paths.append(path)
    return paths


def queue_studies(settings: Any, files: Sequence[Path]) -> list[str]:
    """Spool and record each file as the SCP does, complete and queue the studies in order;
    returns their study UIDs, oldest first."""
    from pydicom import dcmread

    from node.dispatch import preread_task_id
    from node.ledger import InstanceHeader
    from node.spool import sha256_of
    from workers.preread import ledger_for

    ledger = ledger_for(settings)
    spool = settings.storage.spool_path
    uids = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        header = InstanceHeader(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=str(ds.get("Modality", "")),
            body_part=str(ds.get("BodyPartExamined", "")),
            view_position=str(ds.get("ViewPosition", "")),
        )
        relative = f"{header.study_uid}/{header.sop_instance_uid}.dcm"
        (spool / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, spool / relative)
        sha, size = sha256_of(spool / relative)
        ledger.record_instance(
            header, path=relative, sha256=sha, size_bytes=size, revision=1, calling_ae="BENCH"
        )
        uids.append(header.study_uid)
    for study in ledger.complete_quiet_studies(0):
        ledger.mark_queued(study.study_uid, study.version, preread_task_id(study.study_uid, 1))
    return uids


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK


def run_worker(
    files: Sequence[Path], batch: int, engine: ForcedEngine, work: Path
) -> dict[str, Any]:
    """One timed worker run over a fresh data directory; checks every study is done."""
    from node.ledger import StudyState
    from node.settings import load_settings
    from workers.preread import ledger_for, run_preread

    data = work / f"data-b{batch}-{time.monotonic_ns()}"
    settings = load_settings(
        None,
        storage={"data_dir": str(data), "min_free_mb": 0},
        queue={"max_batch": batch},
        engine={"name": "medgemma", "model": "bench/tiny-random-gemma3", "device": "cpu"},
    )
    uids = queue_studies(settings, files)
    engine.batches.clear()
    busy, cpu = machine_busy_seconds(), time.process_time()
    started = time.perf_counter()
    outcomes = [run_preread(settings, uid, 1, engine=engine) for uid in uids]
    seconds = time.perf_counter() - started
    own_cpu = time.process_time() - cpu
    other = max(0.0, machine_busy_seconds() - busy - own_cpu) / seconds
    ledger = ledger_for(settings)
    for uid in uids:
        study = ledger.get_study(uid, 1)
        results = settings.storage.results_path / uid
        if (
            study is None
            or study.state is not StudyState.DONE
            or not list(results.glob("sr-*.dcm"))
        ):
            raise BenchError(f"study {uid} not done with its SR at batch {batch}: {study}")
    ledger.close()
    shutil.rmtree(data, ignore_errors=True)
    return {
        "seconds": round(seconds, 3),
        "studies": len(uids),
        "studies_per_h": round(len(uids) * 3600 / seconds, 1),
        "engine_batches": [len(b) for b in engine.batches],
        "done_by_own_task": outcomes.count("done"),
        "noop_messages": outcomes.count("noop"),
        "worker_cpu_s": round(own_cpu, 2),
        "cpu_ms_per_study": round(own_cpu * 1000 / len(uids), 1),
        "other_load_cores": round(other, 2),
    }


def replay(engine: Any, batches: list[list[Any]], new_tokens: int) -> dict[str, Any]:
    """The engine alone on the worker's recorded batches: the same requests, in the same
    batches and order, timed as a whole (wall and this process's CPU)."""
    cpu, started = time.process_time(), time.perf_counter()
    for requests in batches:
        engine.generate(requests, generation_kwargs={"min_new_tokens": new_tokens})
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    studies = sum(len(b) for b in batches)
    return {
        "seconds": round(seconds, 3),
        "studies": studies,
        "studies_per_h": round(studies * 3600 / seconds, 1),
        "cpu_ms_per_study": round(cpu_s * 1000 / studies, 1),
    }


def summarise(
    batch: int, pairs: list[tuple[dict[str, Any], dict[str, Any]]], detail: dict[str, Any]
) -> dict[str, Any]:
    """Best rates of the repeats; ratios as the median over (worker run, engine replay)
    pairs measured one after the other."""
    workers, engines = [w for w, _ in pairs], [e for _, e in pairs]
    return {
        "batch": batch,
        "worker_studies_per_h": max(w["studies_per_h"] for w in workers),
        "engine_studies_per_h": max(e["studies_per_h"] for e in engines),
        "worker_over_engine": round(
            statistics.median(w["studies_per_h"] / e["studies_per_h"] for w, e in pairs), 3
        ),
        "worker_over_engine_cpu": round(
            statistics.median(e["cpu_ms_per_study"] / w["cpu_ms_per_study"] for w, e in pairs), 3
        ),
        "worker_cpu_ms_per_study": statistics.median(w["cpu_ms_per_study"] for w in workers),
        "engine_cpu_ms_per_study": statistics.median(e["cpu_ms_per_study"] for e in engines),
        "overhead_cpu_ms_per_study": round(
            statistics.median(w["cpu_ms_per_study"] - e["cpu_ms_per_study"] for w, e in pairs), 1
        ),
        "other_load_cores": max(w["other_load_cores"] for w in workers),
        "worker_runs": workers,
        "engine_replays": engines,
        "engine_batch_detail": detail,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    import transformers

    from bench.tiny_gemma import TINY_MM_TOKENS, TINY_TEXT, TINY_VISION, save_gemma3_checkpoint
    from workers.engines.medgemma import MedGemmaEngine

    # one thread by default: on a shared machine, a second thread waiting on a preempted
    # one makes timings swing; worker and peer run with the same setting
    torch.set_num_threads(args.threads)
    system, prompt = preread_prompt(default_prompt_tokens())
    report: dict[str, Any] = {
        "what": "worker pre-read studies/hour at queue.max_batch B vs the engine alone",
        "model": "random-weight Gemma 3 (tiny), CPU: NOT MedGemma, NOT a GPU figure",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "studies": args.studies,
        "image": [args.rows, args.cols],
        "new_tokens": args.new_tokens,
        "prompt_text_tokens": len(system) + len(prompt),
        "repeats": args.repeats,
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="worker-batch-") as tmp:
        work = Path(tmp)
        model = save_gemma3_checkpoint(
            work / "model",
            text=TINY_TEXT,
            vision=TINY_VISION,
            mm_tokens_per_image=TINY_MM_TOKENS,
            printable_only=False,
        )
        files = write_images(work / "images", args.studies, args.rows, args.cols)
        # prefix cache off: it serves follow-ups; a pre-read of a new study only fills it,
        # and the peer's repeated requests would hit it where the worker's never do
        engine = MedGemmaEngine(str(model), "random-weights", device="cpu", prefix_cache_studies=0)
        forced = ForcedEngine(engine, args.new_tokens, system, prompt)
        run_worker(files[: max(args.batch)], max(args.batch), forced, work)  # warm-up, untimed
        for batch in args.batch:
            pairs = []
            for _ in range(args.repeats):  # worker, then the engine on its batches: ABAB
                worker = run_worker(files, batch, forced, work)
                pairs.append((worker, replay(engine, list(forced.batches), args.new_tokens)))
            requests = next(b for b in forced.batches if len(b) == batch)
            detail = measure_batch(engine, requests, args.new_tokens, args.repeats, torch)
            row = summarise(batch, pairs, detail)
            report["results"].append(row)
            print(_line(row), flush=True)
    first = report["results"][0]
    for row in report["results"]:
        for who in ("worker", "engine"):
            row[f"{who}_speedup_over_first"] = round(
                row[f"{who}_studies_per_h"] / first[f"{who}_studies_per_h"], 2
            )
    print(_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {args.out}")
    return 0


def _line(row: dict[str, Any]) -> str:
    return (
        f"batch {row['batch']:>3}: worker {row['worker_studies_per_h']:>8.0f}/h, engine "
        f"{row['engine_studies_per_h']:>8.0f}/h, worker/engine {row['worker_over_engine']:.2f} "
        f"(CPU {row['worker_over_engine_cpu']:.2f}), other load up to "
        f"{row['other_load_cores']:.2f} cores"
    )


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"\n{report['model']}; {report['studies']} studies of {report['image'][0]} x "
        f"{report['image'][1]} px, {report['new_tokens']} new tokens, "
        f"{report['repeats']} repeats",
        f"{'B':>3} {'worker/h':>9} {'engine/h':>9} {'w/e wall':>8} {'w/e CPU':>8} "
        f"{'worker CPU ms':>13} {'engine CPU ms':>13} {'worker xB1':>10} {'engine xB1':>10} "
        f"{'other load':>10}",
    ]
    for row in report["results"]:
        lines.append(
            f"{row['batch']:>3} {row['worker_studies_per_h']:>9.0f} "
            f"{row['engine_studies_per_h']:>9.0f} {row['worker_over_engine']:>8.2f} "
            f"{row['worker_over_engine_cpu']:>8.2f} {row['worker_cpu_ms_per_study']:>13.1f} "
            f"{row['engine_cpu_ms_per_study']:>13.1f} {row['worker_speedup_over_first']:>10.2f} "
            f"{row['engine_speedup_over_first']:>10.2f} {row['other_load_cores']:>10.2f}"
        )
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens forced per study")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--rows", type=int, default=1250)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="16 studies, batches 1 4 16")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "worker_batch.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.batch, args.repeats = 16, [1, 4, 16], 2
    if args.new_tokens < 2 or args.repeats < 1 or min(args.batch) < 1:
        parser.error("--new-tokens must be >= 2, --repeats and every --batch >= 1")
    if max(args.batch) > args.studies:
        parser.error("--studies must be at least the largest --batch")
    return args


if __name__ == "__main__":
    sys.exit(main())
