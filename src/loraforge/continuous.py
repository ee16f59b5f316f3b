"""Continuous updates of a foundation adapter: train a candidate from the active version, gate, promote.

One update:
1. the candidate starts from the active version's weights (same rank, targets and settings) and trains
   on the new data plus a replay sample of the data every earlier version was trained on;
2. every suite in the lineage (each version keeps the suite it was gated by in `suite.json`) and the
   new one are run on the candidate and on the parent;
3. `decide_promotion` promotes (atomically: serving switches on the next request) or rejects with its
   reasons, leaving the active version alone; the decision and scores are stored with the version.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from loraforge.config import parse_train_config
from loraforge.data import Example, load_examples_from_file
from loraforge.errors import ConfigError, DataError
from loraforge.evals.gate import GatePolicy, decide_promotion
from loraforge.evals.suite import Suite, parse_suite
from loraforge.store import AdapterVersion, Store

EXIT_PROMOTED, EXIT_REJECTED = 0, 3


@dataclass
class UpdateOptions:
    replay_ratio: float = 1.0  # replay examples per new example (0 = no replay)
    seed: int = 0
    policy: GatePolicy = field(default_factory=GatePolicy)
    keep: int | None = None  # retention policy: keep the newest K versions (active and its parent always)
    num_epochs: float | None = None  # override the parent's epochs for this update
    learning_rate: float | None = None  # override the parent's learning rate for this update

    def to_json(self) -> dict:
        return {**asdict(self), "policy": asdict(self.policy)}

    @classmethod
    def from_json(cls, raw: dict) -> UpdateOptions:
        policy = dict(raw.get("policy", {}))
        if "guard" in policy:
            policy["guard"] = tuple(policy["guard"])
        return cls(**{**raw, "policy": GatePolicy(**policy)})


@dataclass
class UpdateResult:
    version: AdapterVersion
    promoted: bool
    reasons: list[str]
    scores: dict[str, dict]
    parent_scores: dict[str, dict]
    replayed: int
    new_examples: int

    @property
    def exit_code(self) -> int:
        return EXIT_PROMOTED if self.promoted else EXIT_REJECTED


def queue_update(queue, name: str, examples: list[Example], suite: Suite | None, options: UpdateOptions,
                 device: str):
    """Submit an update as a job (the worker runs `run_update`)."""
    spec = {"options": options.to_json(), "suite": suite.model_dump(mode="json") if suite is not None else None}
    return queue.submit(adapter=name, spec=spec, records=[{"messages": e.messages} for e in examples],
                        device=device, kind="update")


def lineage_suites(store: Store, version: AdapterVersion) -> dict[str, Suite]:
    """Every suite stored along the lineage, by name (the newest definition wins)."""
    suites: dict[str, Suite] = {}
    for ancestor in store.lineage(version):
        path = ancestor.path / "suite.json"
        if path.is_file():
            suite = parse_suite(json.loads(path.read_text(encoding="utf-8")), source=f"{ancestor.ref}/suite.json")
            suites.setdefault(suite.name, suite)
    return suites


def replay_sample(store: Store, parent: AdapterVersion, new: list[Example], ratio: float, seed: int) -> list[Example]:
    """A deterministic replay sample of what the lineage learned: round(ratio × new) examples, spread
    evenly over the versions (each version's own new data; the root's whole data), so an early lesson
    keeps its share however many updates followed. New records are never replayed."""
    if ratio <= 0:
        return []
    rng = random.Random(seed)
    seen = {json.dumps(e.messages, sort_keys=True) for e in new}
    pools: list[list[Example]] = []
    for ancestor in store.lineage(parent):
        own = ancestor.path / "new_data.jsonl"
        data = own if own.is_file() else ancestor.path / "data.jsonl"
        if not data.is_file():
            continue
        pool = []
        for example in load_examples_from_file(data):
            key = json.dumps(example.messages, sort_keys=True)
            if key not in seen:
                seen.add(key)
                pool.append(example)
        if pool:
            rng.shuffle(pool)
            pools.append(pool)
    wanted = round(ratio * len(new))
    sample: list[Example] = []
    while len(sample) < wanted and any(pools):
        for pool in pools:
            if pool and len(sample) < wanted:
                sample.append(pool.pop())
    return sample


def run_update(store: Store, name: str, new: list[Example], suite: Suite | None, options: UpdateOptions, *,
               run_id: str, device: str = "auto", log: Callable[[str], None] = print, on_progress=None,
               should_stop: Callable[[], bool] = lambda: False, resume: bool = False) -> UpdateResult:
    from loraforge.engine import Engine
    from loraforge.evals.service import evaluate
    from loraforge.pipeline import train_into_store
    from loraforge.train.plan import plan_training

    if not new:
        raise DataError("an update needs new data", field="training_data")
    parent = store.get(name)
    earlier = lineage_suites(store, parent)
    if suite is None and not earlier:
        raise ConfigError(f"{parent.ref} has no suite in its lineage: give the update a --suite to gate on",
                          field="suite")
    config = {k: v for k, v in parent.config.items() if k not in ("name", "eval_suite")}
    if options.num_epochs is not None:
        config.update(num_epochs=options.num_epochs, max_steps=-1)
    if options.learning_rate is not None:
        config["learning_rate"] = options.learning_rate
    if device != "auto":
        config["device"] = device
    spec = parse_train_config(config, source=f"{parent.ref} config", name=name)
    replay = replay_sample(store, parent, new, options.replay_ratio, options.seed)
    examples = [Example(i, e.messages) for i, e in enumerate(new + replay, 1)]
    log(f"update {name}: candidate from {parent.ref}, {len(new)} new examples + {len(replay)} replayed "
        f"(ratio {options.replay_ratio:g})")
    plan = plan_training(spec)
    extra = {"update.json": {"parent": parent.ref, "new_examples": len(new), "replayed": len(replay),
                             "options": options.to_json()},
             "new_data.jsonl": [{"messages": e.messages} for e in new]}
    if suite is not None:
        extra["suite.json"] = suite.model_dump(mode="json", exclude={"source_dir"})
    version, _ = train_into_store(store, plan, examples, run_id=run_id, resume=resume, on_progress=on_progress,
                                  log=log, should_stop=should_stop, status="candidate", parent=parent.version,
                                  init_adapter=store.verify(parent), extra_files=extra)

    suites = dict(earlier)
    if suite is not None:
        suites[suite.name] = suite
    engine = Engine(store, device)
    scores, parent_scores = {}, {}
    try:
        for suite_name, one in sorted(suites.items()):
            scores[suite_name] = evaluate(engine, store, one, adapter=version.ref)["scores"]
            parent_scores[suite_name] = _stored_scores(store, parent, one) or evaluate(
                engine, store, one, adapter=parent.ref)["scores"]
            log(f"suite {suite_name}: parent {_fmt(parent_scores[suite_name])} | candidate "
                f"{_fmt(scores[suite_name])}")
    finally:
        engine.close()  # its decode threads and the base it loaded go with it
    decision = decide_promotion(scores, {k: v for k, v in parent_scores.items() if k in earlier},
                                suite.name if suite else None, options.policy)
    store.record_decision(name, version.version, decision.to_json(),
                          {"scores": scores, "parent_scores": parent_scores, "parent": parent.version,
                           "new_examples": len(new), "replayed": len(replay), "new_suite": suite.name if suite else None})
    if decision.promote:
        version = store.activate(name, version.version)
        log(f"promoted {version.ref}: serving switches on the next request")
    else:
        store.reject(name, version.version, decision.reasons)
        version = store.get(version.ref)
        log(f"rejected {version.ref}; {parent.ref} stays active")
        for reason in decision.reasons:
            log(f"  - {reason}")
    if options.keep:
        pruned = store.prune(name, options.keep)
        if pruned:
            log(f"retention policy (keep {options.keep}): removed " + ", ".join(f"v{v}" for v in pruned))
    return UpdateResult(version, decision.promote, decision.reasons, scores, parent_scores, len(replay), len(new))


def _stored_scores(store: Store, version: AdapterVersion, suite: Suite) -> dict | None:
    """The version's scores on this exact suite (same digest) from an earlier greedy run, if kept."""
    for summary in store.evals(version.name, version.version):
        if summary["suite_digest"] == suite.digest():
            report = store.eval_report(summary["id"])
            if report["samples"] == 1 and report["decoding"]["temperature"] == 0 and report["base"] is None:
                return summary["scores"]
    return None


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in scores.items() if v is not None)


def history(store: Store, name: str) -> dict:
    """Lineage, data added, scores per version, gate decisions and reasons, status changes."""
    versions = store.versions(name)
    if not versions:
        store.get(name)  # raises a 404 naming the adapter
    decisions = store.decisions(name)
    rows = []
    for v in versions:
        update = v.path / "update.json"
        info = json.loads(update.read_text(encoding="utf-8")) if update.is_file() else None
        decision = decisions.get(v.version)
        rows.append({"version": v.version, "ref": v.ref, "status": v.status, "parent": v.parent,
                     "created_at": v.created_at, "data_hash": v.data_hash,
                     "examples": (info or {}).get("new_examples"), "replayed": (info or {}).get("replayed"),
                     "decision": decision["decision"] if decision else None,
                     "reasons": decision["reasons"] if decision else [],
                     "scores": decision["scores"] if decision else {},
                     "parent_scores": decision["parent_scores"] if decision else {}})
    active = next((v.version for v in versions if v.status == "active"), None)
    return {"name": name, "active_version": active, "versions": rows, "log": store.status_log(name)}
