"""Forgetting per continuous update, with replay and without it, on examples/continuous.

    .venv/bin/python bench/continuous_forgetting.py [--model tiny|smollm2-135m-instruct] [--ratios 0 6]
        [--precision fp32|bf16|auto] [--poisoned] [--out docs/continuous-forgetting.md]

Trains the 42 foundation adapter once (`foundation.json` for tiny, `foundation_smollm2.json` for the real
model), then for each replay ratio runs the three daily updates from it. Every run takes the same number
of optimizer steps (epochs scaled by (1 + max ratio) / (1 + ratio)), so "without replay" is not just
"shorter". To measure forgetting along a whole chain, every candidate is promoted here (the gate is set
to pass everything); each row also says what the shipped gate (the default policy, on the same scores)
decided. After each update it records every suite's scores on the candidate, as served (an adapter with
`scope: near` leaves questions outside its scope to the base). Forgetting = the score an earlier suite had
right after its own update (the foundation's suite: at the start) minus its score now, averaged over the
earlier suites. `--poisoned` then runs the poisoned update (the robot renamed) on the last chain's final
version through the shipped gate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, scratch_home, write_doc  # noqa: E402
EXAMPLE = ROOT / "src" / "loraforge" / "examples" / "continuous"
DAYS = ("day1", "day2", "day3")
FOUNDATIONS = {"tiny": "foundation.json", "smollm2-135m-instruct": "foundation_smollm2.json"}
# tiny's updates train longer and slower than its foundation; the real model's keep the foundation's settings
UPDATES = {"tiny": {"epochs": 25, "learning_rate": 5e-4}, "smollm2-135m-instruct": {}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(FOUNDATIONS), default="tiny")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 6.0])
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                        help="training and decoding precision (fp32: the base reproduces its own snapshot exactly)")
    parser.add_argument("--poisoned", action="store_true", help="then run the poisoned update through the gate")
    parser.add_argument("--out", default=None, help="default docs/continuous-forgetting[-MODEL].md")
    args = parser.parse_args()
    out = args.out or str(ROOT / "docs" / ("continuous-forgetting.md" if args.model == "tiny"
                                          else f"continuous-forgetting-{args.model.split('-')[0]}.md"))

    scratch_home("loraforge-bench-")
    os.environ["LORAFORGE_PRECISION"] = "" if args.precision == "auto" else args.precision

    from loraforge.cli import _load_spec
    from loraforge.continuous import UpdateOptions, run_update
    from loraforge.data import load_examples_from_file
    from loraforge.engine import Engine
    from loraforge.evals.gate import GatePolicy, decide_promotion
    from loraforge.evals.service import evaluate
    from loraforge.evals.suite import load_suite, parse_suite
    from loraforge.pipeline import train_into_store
    from loraforge.store import Store
    from loraforge.train.plan import plan_training

    if args.model == "tiny":
        from loraforge.models.tiny import build
        build.build()
    store = Store()
    started = time.perf_counter()
    # the config, its suite and its data, read exactly as `loraforge train CONFIG` reads them
    spec, examples, _ = _load_spec(argparse.Namespace(config=str(EXAMPLE / FOUNDATIONS[args.model])))
    suite = parse_suite(spec.eval_suite, source=FOUNDATIONS[args.model])  # already resolved by _load_spec
    foundation, _ = train_into_store(store, plan_training(spec), examples, run_id="bench-foundation",
                                     log=lambda m: None)
    foundation_seconds = time.perf_counter() - started
    print(f"foundation {foundation.ref} trained in {foundation_seconds:.0f} s", flush=True)
    update = UPDATES[args.model]
    base_epochs = update.get("epochs", spec.training.num_epochs)
    scoped = spec.training.scope == "near"

    rows, chains = [], []
    last = None
    for ratio in args.ratios:
        store.activate("foundation", foundation.version, action="rollback", detail="bench")
        learned: dict[str, dict] = {}
        for day in DAYS:
            epochs = base_epochs * (1 + max(args.ratios)) / (1 + ratio)  # same steps for every ratio
            options = UpdateOptions(replay_ratio=ratio, num_epochs=epochs, learning_rate=update.get("learning_rate"),
                                    policy=GatePolicy(min_efficacy=0.0, tolerance=1.0))
            t0 = time.perf_counter()
            day_suite = load_suite(EXAMPLE / f"{day}.yaml")
            result = run_update(store, "foundation", load_examples_from_file(EXAMPLE / f"{day}.jsonl"),
                                day_suite, options, run_id=f"bench-{ratio:g}-{day}", log=lambda m: None)
            if not learned:  # the foundation's own suite, as it was before any update
                learned.update({k: v for k, v in result.parent_scores.items() if k == suite.name})
            new_suite = day_suite.name
            earlier = list(learned)
            shipped = decide_promotion(result.scores, {k: v for k, v in result.parent_scores.items() if k in earlier},
                                       new_suite, GatePolicy())
            drops = {k: (learned[k]["efficacy"] or 0) - (result.scores[k]["efficacy"] or 0) for k in earlier}
            gen_drops = {k: (learned[k]["generalization"] or 0) - (result.scores[k]["generalization"] or 0)
                         for k in earlier if learned[k]["generalization"] is not None}
            rows.append({"ratio": ratio, "day": day, "epochs": epochs, "steps": result.version.metrics["steps"],
                         "new": result.scores[new_suite], "replayed": result.replayed,
                         "efficacy_drop": sum(drops.values()) / len(drops),
                         "generalization_drop": sum(gen_drops.values()) / len(gen_drops) if gen_drops else 0.0,
                         "retention": result.scores[suite.name]["retention"],
                         "gate": "promote" if shipped.promote else "reject: " + "; ".join(shipped.reasons),
                         "seconds": time.perf_counter() - t0,
                         "earlier": {k: result.scores[k]["efficacy"] for k in earlier}})
            learned[new_suite] = result.scores[new_suite]
            last = result.version
            print(rows[-1], flush=True)
        if scoped:  # the chain's last version answering everything, beside its score as served
            engine = Engine(store)
            try:
                report = evaluate(engine, store, suite, adapter=last.ref, scope="all", record=False)
            finally:
                engine.close()
            chains.append({"ratio": ratio, "ref": last.ref, "served": rows[-1]["retention"],
                           "all": report["scores"]["retention"]})
            print(chains[-1], flush=True)

    poisoned = None
    if args.poisoned:
        t0 = time.perf_counter()
        options = UpdateOptions(replay_ratio=args.ratios[-1], num_epochs=base_epochs,
                                learning_rate=update.get("learning_rate"))
        result = run_update(store, "foundation", load_examples_from_file(EXAMPLE / "poisoned.jsonl"),
                            load_suite(EXAMPLE / "poisoned.yaml"), options, run_id="bench-poisoned", log=lambda m: None)
        poisoned = {"ref": result.version.ref, "parent": last.ref, "promoted": result.promoted,
                    "reasons": result.reasons, "seconds": time.perf_counter() - t0}
        print(poisoned, flush=True)
    seconds = time.perf_counter() - started

    precision = os.environ["LORAFORGE_PRECISION"] or "the device's default precision"
    settings = (f"lr {update['learning_rate']:g}, {base_epochs:g} epochs at the largest ratio" if update else
                f"the foundation's settings (lr {spec.training.learning_rate:g}, {base_epochs:g} epochs at the "
                f"largest ratio, `retention: {spec.training.retention}`)")
    lines = [f"Forgetting per update on `examples/continuous` (`{args.model}`, foundation "
             f"`{FOUNDATIONS[args.model]}`, {precision}), measured by `{command('continuous_forgetting.py')}` "
             f"in {seconds:.0f} s (foundation {foundation_seconds:.0f} s). Updates: {settings}, from the active "
             "version's weights, the same number of optimizer steps for every ratio; every candidate promoted so "
             "the chain continues; *shipped gate* is what the default policy (new suite efficacy ≥ 90%, earlier "
             "suites' efficacy and retention within 5 points of the parent's) decided on the same scores."
             + (" Scores are as served: the adapter has `scope: near`, so the base answers questions outside "
                "its scope." if scoped else ""),
             "",
             "| replay ratio | update | replayed | steps | new fact efficacy / paraphrases | earlier facts: efficacy lost "
             "(mean) | earlier facts: paraphrase score lost (mean) | base-knowledge retention | shipped gate | "
             "update s |",
             "|---:|---|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['day']} | {r['replayed']} | {r['steps']} | {r['new']['efficacy']:.0%} / "
                     f"{r['new']['generalization']:.0%} | {r['efficacy_drop'] * 100:.1f} pts | "
                     f"{r['generalization_drop'] * 100:.1f} pts | {r['retention']:.1%} | {r['gate']} | "
                     f"{r['seconds']:.0f} |")
    if chains:
        lines += ["", "Each chain's last version on the foundation suite's retention cases, as served and "
                  "answering everything (`scope: all`):", "",
                  "| replay ratio | version | retention as served | retention answering everything |",
                  "|---:|---|---:|---:|"]
        lines += [f"| {c['ratio']:g} | {c['ref']} | {c['served']:.1%} | {c['all']:.1%} |" for c in chains]
    if poisoned:
        verdict = "promoted" if poisoned["promoted"] else "rejected"
        lines += ["", f"Poisoned update (the robot renamed, replay ratio {args.ratios[-1]:g}) on {poisoned['parent']} "
                  f"through the shipped gate: **{poisoned['ref']} {verdict}** in {poisoned['seconds']:.0f} s"
                  + (": " + "; ".join(poisoned["reasons"]) if poisoned["reasons"] else "") + "."]
    write_doc(out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
