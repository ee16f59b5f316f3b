"""Train an adapter into the store: plan → recipe → publish as the next version.

Used by the CLI now and by the job worker; it is the one place where a run becomes a version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from loraforge import paths
from loraforge.data import Example, load_examples_from_file
from loraforge.errors import ConfigError
from loraforge.scope import read_scope, scope_questions, write_scope
from loraforge.store import AdapterVersion, Store
from loraforge.train.plan import TrainPlan
from loraforge.train.recipe import Progress, TrainResult, train


def train_into_store(store: Store, plan: TrainPlan, examples: list[Example], *, run_id: str, resume: bool = False,
                     on_progress: Callable[[Progress], None] | None = None, log: Callable[[str], None] = print,
                     should_stop: Callable[[], bool] = lambda: False,
                     status: str = "active", parent: int | None = None, init_adapter: Path | None = None,
                     extra_files: dict[str, object] | None = None) -> tuple[AdapterVersion, TrainResult]:
    """Train and publish. `extra_files` (name -> JSON object, or a list of rows for .jsonl) are stored in
    the version folder too."""
    run_dir = store.run_dir(run_id)
    staged = store.new_tmp_dir()
    result = train(plan, examples, run_dir=run_dir, out_dir=staged, resume=resume, on_progress=on_progress,
                   log=log, should_stop=should_stop, monitor=knowledge_monitor(plan.spec), init_adapter=init_adapter)
    with open(staged / "data.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n" for e in examples)
    # what the version was taught, with what its lineage was: `scope: near` serves these questions only
    write_scope(staged, scope_questions(examples, inherited_scope(store, plan.spec.name, parent)))
    extra_files = dict(extra_files or {})
    if isinstance(plan.spec.eval_suite, dict):  # the suite it was trained against gates its later updates
        extra_files.setdefault("suite.json", {k: v for k, v in plan.spec.eval_suite.items() if k != "source_dir"})
    for file_name, content in extra_files.items():
        target = paths.inside(staged, file_name)
        if file_name.endswith(".jsonl"):
            paths.atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content))
        else:
            paths.atomic_write_json(target, content)
    manifest = result.manifest
    version = store.publish(
        plan.spec.name, staged, base_model=manifest["base_model"]["id"],
        base_fingerprint=manifest["base_model"]["fingerprint"], config=manifest["config"],
        data_hash=manifest["data"]["hash"], metrics=manifest["training"], size=manifest["size"],
        status=status, parent=parent,
    )
    paths.remove_tree(run_dir)  # the version is the durable result; checkpoints are no longer needed
    return version, result


def inherited_scope(store: Store, name: str, parent: int | None) -> list[str]:
    """The parent version's scope questions; for a parent trained before scopes were kept, its own data's."""
    if parent is None:
        return []
    folder = store.version_dir(name, parent)
    questions = read_scope(folder)
    if questions is not None:
        return questions
    data = paths.inside(folder, "data.jsonl")
    return scope_questions(load_examples_from_file(data)) if data.is_file() else []


def knowledge_monitor(spec):
    """The training-time evaluator for a spec's eval_suite (already resolved to a mapping), if any."""
    if spec.eval_suite is None:
        return None
    from loraforge.evals.monitor import KnowledgeMonitor
    from loraforge.evals.suite import parse_suite

    if not isinstance(spec.eval_suite, dict):
        raise ConfigError("eval_suite must be resolved to a suite before training", field="eval_suite")
    return KnowledgeMonitor(parse_suite(spec.eval_suite, source="eval_suite"), target=spec.training.eval_target,
                            model_name=spec.model_name)


def unfinished_run(store: Store, run_id: str) -> int | None:
    """The step of the last checkpoint of an unfinished run, if any."""
    from loraforge.train.checkpoint import latest_checkpoint, read_state

    run_dir = store.run_dir(run_id)
    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return read_state(latest)["step"] if latest else None


def discard_run(store: Store, run_id: str) -> None:
    paths.remove_tree(store.run_dir(run_id))
