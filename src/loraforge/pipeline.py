"""Train an adapter into the store: plan → recipe → publish as the next version.

Used by the CLI now and by the job worker; it is the one place where a run becomes a version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from loraforge import paths
from loraforge.data import Example
from loraforge.store import AdapterVersion, Store
from loraforge.train.plan import TrainPlan
from loraforge.train.recipe import Progress, TrainResult, train


def train_into_store(store: Store, plan: TrainPlan, examples: list[Example], *, run_id: str, resume: bool = False,
                     on_progress: Callable[[Progress], None] | None = None, log: Callable[[str], None] = print,
                     should_stop: Callable[[], bool] = lambda: False,
                     status: str = "active", parent: int | None = None) -> tuple[AdapterVersion, TrainResult]:
    run_dir = store.run_dir(run_id)
    staged = store.new_tmp_dir()
    result = train(plan, examples, run_dir=run_dir, out_dir=staged, resume=resume, on_progress=on_progress,
                   log=log, should_stop=should_stop)
    with open(staged / "data.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n" for e in examples)
    manifest = result.manifest
    version = store.publish(
        plan.spec.name, staged, base_model=manifest["base_model"]["id"],
        base_fingerprint=manifest["base_model"]["fingerprint"], config=manifest["config"],
        data_hash=manifest["data"]["hash"], metrics=manifest["training"], size=manifest["size"],
        status=status, parent=parent,
    )
    paths.remove_tree(run_dir)  # the version is the durable result; checkpoints are no longer needed
    return version, result


def unfinished_run(store: Store, run_id: str) -> int | None:
    """The step of the last checkpoint of an unfinished run, if any."""
    from loraforge.train.checkpoint import latest_checkpoint, read_state

    run_dir = store.run_dir(run_id)
    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return read_state(latest)["step"] if latest else None


def discard_run(store: Store, run_id: str) -> None:
    paths.remove_tree(store.run_dir(run_id))
