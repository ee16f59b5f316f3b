"""Forgetting per continuous update, with replay and without it, on examples/continuous (built-in model).

    .venv/bin/python bench/continuous_forgetting.py [--ratios 0 6] [--out docs/continuous-forgetting.md]

Trains the 42 foundation adapter once, then for each replay ratio runs the three daily updates from it.
Every run takes the same number of optimizer steps (epochs scaled by (1 + max ratio) / (1 + ratio)), so
"without replay" is not just "shorter".
To measure forgetting along a whole chain, every candidate is promoted here (the gate is set to pass
everything); the shipped flow gates them. After each update it records every suite's scores on the
candidate. Forgetting = the score an earlier suite had right after its own update (the foundation's
suite: at the start) minus its score now, averaged over the earlier suites.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, scratch_home, write_doc  # noqa: E402
EXAMPLE = ROOT / "src" / "loraforge" / "examples" / "continuous"
DAYS = ("day1", "day2", "day3")
UPDATE = {"epochs": 25, "learning_rate": 5e-4}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 6.0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "continuous-forgetting.md"))
    args = parser.parse_args()

    scratch_home("loraforge-bench-")

    from loraforge.config import load_config_file, parse_train_config
    from loraforge.continuous import UpdateOptions, run_update
    from loraforge.data import load_examples_from_file, load_examples_from_files
    from loraforge.evals.gate import GatePolicy
    from loraforge.evals.suite import load_suite, resolve_suite
    from loraforge.models.tiny import build
    from loraforge.pipeline import train_into_store
    from loraforge.store import Store
    from loraforge.train.plan import plan_training

    build.build()
    store = Store()
    started = time.perf_counter()
    raw = load_config_file(EXAMPLE / "foundation.json")
    spec = parse_train_config(raw, source="foundation.json")
    suite = resolve_suite(spec.eval_suite, EXAMPLE, contain=False)
    spec = spec.model_copy(update={"eval_suite": suite.model_dump(mode="json")})
    examples = load_examples_from_files([EXAMPLE / f for f in spec.training_data])
    foundation, _ = train_into_store(store, plan_training(spec), examples, run_id="bench-foundation",
                                     log=lambda m: None)
    print(f"foundation {foundation.ref} trained", flush=True)

    rows = []
    for ratio in args.ratios:
        store.activate("foundation", foundation.version, action="rollback", detail="bench")
        learned: dict[str, dict] = {}
        for day in DAYS:
            epochs = UPDATE["epochs"] * (1 + max(args.ratios)) / (1 + ratio)  # same steps for every ratio
            options = UpdateOptions(replay_ratio=ratio, num_epochs=epochs,
                                    learning_rate=UPDATE["learning_rate"],
                                    policy=GatePolicy(min_efficacy=0.0, tolerance=1.0))
            result = run_update(store, "foundation", load_examples_from_file(EXAMPLE / f"{day}.jsonl"),
                                load_suite(EXAMPLE / f"{day}.yaml"), options, run_id=f"bench-{ratio:g}-{day}",
                                log=lambda m: None)
            if not learned:  # the foundation's own suite, as it was before any update
                learned.update({k: v for k, v in result.parent_scores.items() if k == suite.name})
            new_suite = load_suite(EXAMPLE / f"{day}.yaml").name
            earlier = [k for k in learned]
            drops = {k: (learned[k]["efficacy"] or 0) - (result.scores[k]["efficacy"] or 0) for k in earlier}
            gen_drops = {k: (learned[k]["generalization"] or 0) - (result.scores[k]["generalization"] or 0)
                         for k in earlier if learned[k]["generalization"] is not None}
            rows.append({"ratio": ratio, "day": day, "epochs": epochs, "steps": result.version.metrics["steps"], "new": result.scores[new_suite], "replayed": result.replayed,
                         "efficacy_drop": sum(drops.values()) / len(drops),
                         "generalization_drop": sum(gen_drops.values()) / len(gen_drops) if gen_drops else 0.0,
                         "retention": result.scores[suite.name]["retention"],
                         "earlier": {k: result.scores[k]["efficacy"] for k in earlier}})
            learned[new_suite] = result.scores[new_suite]
            print(rows[-1], flush=True)
    seconds = time.perf_counter() - started

    lines = [f"Forgetting per update on `examples/continuous` (built-in model), measured by "
             f"`{command('continuous_forgetting.py')}` "
             f"in {seconds:.0f} s. Updates: lr {UPDATE['learning_rate']:g}, from the active version's weights, the same "
             "number of optimizer steps for every ratio; every candidate promoted so the chain continues.",
             "",
             "| replay ratio | update | replayed | steps | new fact efficacy / paraphrases | earlier facts: efficacy lost "
             "(mean) | earlier facts: paraphrase score lost (mean) | base-knowledge retention |",
             "|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['day']} | {r['replayed']} | {r['steps']} | {r['new']['efficacy']:.0%} / "
                     f"{r['new']['generalization']:.0%} | {r['efficacy_drop'] * 100:.1f} pts | "
                     f"{r['generalization_drop'] * 100:.1f} pts | {r['retention']:.1%} |")
    write_doc(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
