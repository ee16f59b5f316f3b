"""What routing would keep: the adapter answers only questions near what it was taught, the base the rest.

    .venv/bin/python bench/retention_routing.py [--facts dev|heldout] [--seeds 0] [--method 'kl x4 all']
        [--thresholds 0.1 0.2 0.3 0.4 0.5] [--out docs/retention-routing.md]

The threshold sweep behind `scope: near` (`loraforge/scope.py`), offline: it trains the method of
`retention_methods.py` on the same facts, evaluates the base and the adapter (answering everything) on
every case (targets, held-out paraphrases, the base's correct retention probes), then scores each case
as routing would answer it at each threshold: by the adapter when the case's prompt is at least
`threshold` similar to one of the training questions (`Scope.similarity`: TF-IDF cosine of content
words and word pairs, fitted on the training questions), else by the base (SERAC-style scope, Mitchell
et al. 2022). The default threshold was chosen on the dev facts with it; the shipped feature is measured
through the engine by `retention_methods.py --methods 'kl x4 all scope near'`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, scratch_home, write_doc  # noqa: E402
from retention_methods import BASE, METHODS, load_facts, suite_for, training_records  # noqa: E402
from retention_methods import percent_cell as cell  # noqa: E402



def routed_scores(cases: list[dict], base_cases: dict[str, dict], similarity: dict[str, float],
                  threshold: float) -> dict[str, float]:
    """Efficacy, generalization and retention when cases at or above `threshold` go to the adapter."""
    kinds = {"target": "efficacy", "paraphrase": "generalization", "retention": "retention"}
    passed: dict[str, list[bool]] = {k: [] for k in kinds.values()}
    for case in cases:
        base = base_cases[case["id"]]
        if case["kind"] == "retention" and not base["passed"]:
            continue  # retention counts what the base got right
        chosen = case if similarity[case["id"]] >= threshold else base
        passed[kinds[case["kind"]]].append(chosen["passed"])
    return {k: sum(v) / len(v) for k, v in passed.items() if v}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--facts", choices=["dev", "heldout"], default="dev")
    parser.add_argument("--method", default="kl x4 all", choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--out", default=str(ROOT / "docs" / "retention-routing.md"))
    args = parser.parse_args()

    os.environ["LORAFORGE_PRECISION"] = args.precision
    scratch_home("loraforge-routing-")
    from loraforge.config import parse_train_config
    from loraforge.data import load_examples
    from loraforge.engine import Engine
    from loraforge.evals.service import evaluate
    from loraforge.evals.suite import parse_suite
    from loraforge.pipeline import train_into_store
    from loraforge.scope import Scope
    from loraforge.store import Store
    from loraforge.train.plan import plan_training

    started = time.perf_counter()
    store = Store()
    engine = Engine(store)
    facts = load_facts(args.facts)
    questions = [q for f in facts for q in f["questions"]]
    suite = parse_suite(suite_for(facts, retention=True))
    nearest = Scope(questions).similarity

    base = evaluate(engine, store, suite, model=args.model, record=False)
    base_cases = {c["id"]: c for c in base["cases"]}
    rows: dict[float, list[dict]] = {t: [] for t in [0.0, *args.thresholds]}
    routed_probes: dict[float, list[int]] = {t: [] for t in rows}
    for seed in args.seeds:
        config = {**BASE, **METHODS[args.method], "seed": seed, "model_name": args.model, "name": f"route-s{seed}"}
        plan = plan_training(parse_train_config(config, source=args.method))
        version, _ = train_into_store(store, plan, load_examples(training_records(facts), "facts"),
                                      run_id=config["name"], log=lambda m: None)
        report = evaluate(engine, store, suite, adapter=version.ref, record=False, scope="all")
        engine.unload_adapter(version.ref)
        similarity = {c["id"]: nearest(c["prompt"]) for c in report["cases"]}
        for threshold in rows:
            rows[threshold].append(routed_scores(report["cases"], base_cases, similarity, threshold))
            routed_probes[threshold].append(sum(1 for c in report["cases"] if c["kind"] == "retention"
                                                and similarity[c["id"]] >= threshold))
        print(f"seed {seed}: " + "; ".join(f"{t}: {rows[t][-1]}" for t in rows), flush=True)

    counts = base["counts"]
    lines = [f"# Routing, measured offline: {args.method} on {args.model} ({args.facts} facts)", "",
             f"Command: `{command('retention_routing.py')}` ({time.perf_counter() - started:.0f} s)", "",
             f"{len(facts)} invented facts × 3 training questions; {counts['efficacy']} target, "
             f"{counts['generalization']} held-out paraphrase and {counts['retention']} retention cases. Seeds "
             f"{', '.join(map(str, args.seeds))}; {args.precision}. Threshold 0 is the adapter alone (every case "
             "answered by it). Retention probes routed: how many of the retention cases the rule sends to the "
             "adapter (the rest the base answers).", "",
             "| routing threshold | efficacy | paraphrases | retention | retention probes routed to the adapter |",
             "|---:|---:|---:|---:|---:|"]
    for threshold, results in rows.items():
        lines.append(f"| {threshold:g} | {cell([r['efficacy'] for r in results])} | "
                     f"{cell([r['generalization'] for r in results])} | {cell([r['retention'] for r in results])} | "
                     f"{statistics.fmean(routed_probes[threshold]):.0f} of {counts['retention']} |")
    write_doc(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
