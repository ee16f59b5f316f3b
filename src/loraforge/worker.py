"""The training worker: one process per job, so a crash or OOM never takes the server down.

Started by the server's scheduler as `python -m loraforge.worker JOB_ID` (arguments as a list, never
a shell string). It reads the job from the queue, trains into the store, and records the outcome.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from dataclasses import asdict

from loraforge import paths
from loraforge.config import TrainSpec
from loraforge.data import load_examples_from_file
from loraforge.errors import LoraforgeError
from loraforge.jobs import JobQueue, hold_lock
from loraforge.pipeline import train_into_store
from loraforge.store import Store
from loraforge.train.plan import plan_training
from loraforge.train.recipe import Stopped


def run_job(job_id: str) -> int:
    store = Store()
    queue = JobQueue(store)
    job = queue.get(job_id)
    if job.status != "running":
        return 0
    try:
        _lock = hold_lock(queue.lock_file(job_id))  # how a restarted server tells this process is alive
    except OSError:
        return 0  # another worker already runs this job
    last_check = [0.0, False]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last_check[0] > 0.5:
            last_check[0] = now
            last_check[1] = queue.get(job_id).status != "running"
        return last_check[1]

    on_progress = lambda p: queue.add_event(job_id, "progress", asdict(p))  # noqa: E731
    log = lambda m: queue.add_event(job_id, "log", {"message": m})  # noqa: E731
    try:
        if job.kind == "tune":
            outcome = _tune(store, queue, job, should_stop, log)
            if not queue.finish(job_id, "succeeded", result=outcome):
                queue.add_event(job_id, "log", {"message": "finished after the job was cancelled"})
            return 0
        examples = load_examples_from_file(queue.data_file(job_id))
        if job.kind == "update":
            outcome = _update(store, queue, job, examples, on_progress, log, should_stop)
        else:
            plan = plan_training(TrainSpec.model_validate(job.spec))
            version, _ = train_into_store(store, plan, examples, run_id=job_id, resume=job.resume,
                                          on_progress=on_progress, log=log, should_stop=should_stop)
            outcome = version.ref
        if not queue.finish(job_id, "succeeded", result=outcome):
            queue.add_event(job_id, "log", {"message": f"finished as {outcome} after the job was cancelled"})
    except Stopped:
        paths.remove_tree(store.run_dir(job_id))
    except LoraforgeError as exc:
        queue.finish(job_id, "failed", error=exc.message)
    except MemoryError:
        queue.finish(job_id, "failed", error="out of memory: try a smaller batch_size or max_seq_length")
    except Exception as exc:  # out of memory and a full disk are the user's to fix: say so, in one line
        if isinstance(exc, RuntimeError) and _out_of_memory(exc):
            error = ("out of memory: try a smaller batch_size or max_seq_length, gradient checkpointing, or 4-bit "
                     "(`loraforge validate` estimates)")
        elif (code := _disk_full(exc)) is not None:
            error = (f"the disk is full ({os.strerror(code)}) while writing the job's files; free space and start "
                     "it again (earlier versions are untouched)")
        else:
            return _internal(queue, store, job_id, exc)
        queue.finish(job_id, "failed", error=error)
        return 1
    return 0


def _disk_full(exc: BaseException) -> int | None:
    """The errno of a write that found the disk (or a quota, or a file-size limit) full; None for other errors.
    safetensors reports it in its message ("I/O error: File too large (os error 27)")."""
    codes = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if isinstance(exc, OSError) and exc.errno in codes:
        return exc.errno
    text = str(exc)
    return next((code for code in codes if f"(os error {code})" in text or os.strerror(code) in text), None)


def _out_of_memory(exc: RuntimeError) -> bool:
    """torch's allocators say so in a RuntimeError (CPU: "can't allocate memory"; CUDA: OutOfMemoryError)."""
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _internal(queue, store, job_id: str, exc: BaseException) -> int:
    """An unexpected failure: the traceback goes to the job's log file, one line to clients."""
    log_file = store.root / "jobs" / f"{job_id}.log"
    log_file.write_text("".join(traceback.format_exception(exc)))
    first = (str(exc).splitlines() or [""])[0][:200].replace(str(store.root), "$LORAFORGE_HOME")
    queue.finish(job_id, "failed", error=f"internal error: {type(exc).__name__}: {first}")
    return 1


def _update(store, queue, job, examples, on_progress, log, should_stop):
    """A continuous update as a job: train the candidate, gate it, record the decision as an event."""
    from loraforge.continuous import UpdateOptions, run_update
    from loraforge.evals.suite import parse_suite

    suite = parse_suite(job.spec["suite"], source="suite") if job.spec.get("suite") else None
    result = run_update(store, job.adapter, examples, suite, UpdateOptions.from_json(job.spec["options"]),
                        run_id=job.id, device=job.device, log=log, on_progress=on_progress,
                        should_stop=should_stop, resume=job.resume)
    queue.add_event(job.id, "decision", {"version": result.version.ref, "promoted": result.promoted,
                                         "reasons": result.reasons, "scores": result.scores,
                                         "parent_scores": result.parent_scores})
    return f"{result.version.ref} {'promoted' if result.promoted else 'rejected'}"


def _tune(store, queue, job, should_stop, log) -> str:
    """A tuning study as a job: every finished trial becomes a `trial` event (its results.jsonl row)."""
    from loraforge.tune.runner import run_tuning
    from loraforge.tune.spec import TuneSpec

    spec = TuneSpec.model_validate(job.spec)
    summaries = run_tuning(spec, base_dir=store.root, on_trial=lambda row: queue.add_event(job.id, "trial", row),
                           log=log, should_stop=should_stop)
    for s in summaries:  # best trials and parameter importance, for the API and the dashboard
        queue.add_event(job.id, "summary", {k: v for k, v in s.items() if k != "plots"})
    parts = []
    for s in summaries:
        best = s["best"][0] if s.get("best") else None
        parts.append(f"{s['study']}: " + (f"best {best['accuracy']:.1%} (trial {best['trial']})" if best
                                           else "no trial finished"))
    return "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(run_job(sys.argv[1]))
