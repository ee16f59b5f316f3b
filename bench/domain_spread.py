"""Per-domain spread: best, median and worst test accuracy over a small LoRA grid, on the built-in model
or a real one.

    .venv/bin/python bench/domain_spread.py [--model tiny|smollm2-135m-instruct|FOLDER] [--domains financial legal ...]
        [--epochs 8] [--train-size 64] [--learning-rates 3e-4 3e-3] [--ranks 4 16] [--targets q_proj+v_proj all-linear]
        [--out docs/domain-spread.md]

Runs the tuner itself (`strategy: grid`, one study per domain) on a scratch home. Every trial trains on
the domain's train split (64 tasks, or `--train-size`), keeps its best epoch by validation accuracy (32
tasks) and is scored once on the test split (32 tasks), greedy, exact match. The grid is small on purpose — the tuner
explores; this measures whether there is anything to tune: learning rate x rank x target modules.
`--epochs` is the budget per trial (the tuner's budget axis); the same grid at a larger budget shows
which domains are slow to learn rather than out of reach, and a larger train split whether they lack data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, scratch_home, write_doc  # noqa: E402

SPACE = {"learning_rate": [3e-4, 3e-3], "r": [4, 16], "target_modules": [["q_proj", "v_proj"], "all-linear"]}
EPOCHS = 8
TRAIN_SIZE = 64


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", nargs="+")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per trial (default %(default)s)")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE,
                        help="training tasks per domain (default %(default)s)")
    parser.add_argument("--model", default="tiny", help="the base: tiny, a catalog alias, a folder (default tiny)")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=SPACE["learning_rate"])
    parser.add_argument("--ranks", type=int, nargs="+", default=SPACE["r"])
    parser.add_argument("--targets", nargs="+", default=["q_proj+v_proj", "all-linear"],
                        help="target module sets: all-linear, or module names joined by +")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto")
    parser.add_argument("--out", default=str(ROOT / "docs" / "domain-spread.md"))
    args = parser.parse_args()
    space = {"learning_rate": args.learning_rates, "r": args.ranks,
             "target_modules": [t if t == "all-linear" else t.split("+") for t in args.targets]}
    os.environ["LORAFORGE_PRECISION"] = "" if args.precision == "auto" else args.precision

    home = scratch_home("loraforge-spread-")

    from loraforge.models.resolve import model_folder, resolve_base_model
    from loraforge.tune.domains import DOMAINS
    from loraforge.tune.runner import run_tuning
    from loraforge.tune.spec import parse_tune_spec

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.tune.objective import domain_data, score

    model_dir = model_folder(resolve_base_model(args.model))
    domains = args.domains or sorted(DOMAINS)
    spec = parse_tune_spec({"name": "spread", "model": args.model, "domains": domains, "strategy": "grid", "epochs": args.epochs,
                            "train_size": args.train_size,
                            "space": space, "fixed": {"batch_size": 8, "lora_dropout": 0.0}})
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_scores = {d: score(base, tokenizer, domain_data(spec, d).test, device="cpu", max_tokens=spec.max_new_tokens)
                   for d in domains}
    del base
    started = time.perf_counter()
    summaries = run_tuning(spec, log=lambda m: None)
    seconds = time.perf_counter() - started
    rows = []
    for summary in summaries:
        results = [json.loads(line) for line in
                   (home / "tuning" / "spread" / summary["domain"] / "results.jsonl").read_text().splitlines()]
        tests = [r["test_accuracy"] for r in results if r["state"] == "complete"]
        rows.append((summary["domain"], base_scores[summary["domain"]], max(tests), statistics.median(tests),
                     min(tests), len(tests)))
        print(rows[-1], flush=True)
    configs = rows[0][5] if rows else 0
    model = "the built-in model" if args.model == "tiny" else f"`{args.model}`"
    lines = [f"Test accuracy (exact match, 32 held-out tasks, greedy) on {model} after LoRA on "
             f"{args.train_size} training tasks, up to {args.epochs} epochs (the epoch with the best validation "
             f"accuracy is kept), over "
             f"the grid learning_rate {args.learning_rates} x r {args.ranks} x target_modules "
             f"[{', '.join(args.targets)}] ({configs} configs per domain, `loraforge tune` with strategy grid). "
             f"Measured by "
             f"`{command('domain_spread.py')}` in {seconds:.0f} s "
             "on 2 CPU cores.", "",
             "| domain | base | best | median | worst | best − worst |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {d} | {b:.0%} | {hi:.0%} | {mid:.0%} | {lo:.0%} | {(hi - lo) * 100:.0f} pts |" for d, b, hi, mid, lo, _ in rows]
    write_doc(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
