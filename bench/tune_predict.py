"""The seed's "24x faster" claim, measured: the whole grid versus `predict` and, at the same budget, `random` and `tpe`.

    .venv/bin/python bench/tune_predict.py [--domains marketing ...] [--out docs/tuning-predict.md]

One scratch home, one run, the same domains, grid and epochs for every strategy. The grid is trained in
full, so for any strategy we can say where its chosen configuration ranks among all of them. Training is
deterministic on the CPU (same seed), so a configuration scores the same whichever strategy picked it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, scratch_home, write_doc  # noqa: E402

SPACE = {"r": [4, 16], "learning_rate": [1e-4, 3e-4, 1e-3, 3e-3], "weight_decay": [1e-5, 1e-2],
         "target_modules": [["q_proj", "v_proj"], "all-linear"]}
SAMPLES, VERIFY, EPOCHS = 8, 3, 6


def _rows(home: Path, name: str, domain: str) -> list[dict]:
    path = home / "tuning" / name / domain / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _key(row: dict) -> str:
    return json.dumps(row["params"], sort_keys=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", nargs="+", default=["marketing"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "tuning-predict.md"))
    args = parser.parse_args()
    home = scratch_home("loraforge-predict-")

    from loraforge.models.tiny import build
    from loraforge.tune.runner import run_tuning
    from loraforge.tune.spec import parse_tune_spec

    build.build()
    common = {"domains": args.domains, "epochs": EPOCHS, "space": SPACE, "fixed": {"batch_size": 8}}
    budget = SAMPLES + VERIFY
    runs = {"grid": {}, "predict": {"predict": {"samples": SAMPLES, "verify": VERIFY}},
            "random": {"trials": budget}, "tpe": {"trials": budget}}
    started = time.perf_counter()
    for strategy, extra in runs.items():
        spec = parse_tune_spec({"name": strategy.replace("+", "-"), "strategy": strategy, **common, **extra})
        run_tuning(spec, log=lambda m: None, on_trial=lambda r: None)
    seconds = time.perf_counter() - started

    lines = [f"Whole grid versus the seed's `predict` ({SAMPLES} sampled configurations, a random-forest surrogate, "
             f"the top {VERIFY} predicted trained) and, with the same budget of {budget} trials, `random` and `tpe`. "
             f"Grid: r {SPACE['r']} x learning_rate {SPACE['learning_rate']} x weight_decay {SPACE['weight_decay']} "
             f"x target_modules [q_proj+v_proj, all-linear]; {EPOCHS} epochs per trial, 64 training / 32 validation "
             f"/ 32 test tasks, built-in model, CPU. Each strategy picks its best by validation accuracy; *rank* is "
             f"where that configuration stands among all grid configurations by validation accuracy (1 = the best; "
             f"ties share a rank). Measured by `{command('tune_predict.py')}`"
             f" in {seconds:.0f} s on 2 CPU cores.", "",
             "| domain | strategy | configs trained | device s | device time vs grid | best validation | its test | "
             "rank in grid |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for domain in args.domains:
        grid_rows = [r for r in _rows(home, "grid", domain) if r["state"] == "complete"]
        grid_val = {_key(r): r["accuracy"] for r in grid_rows}
        grid_seconds = sum(r["device_seconds"] for r in grid_rows)
        for strategy in runs:
            rows = [r for r in _rows(home, strategy.replace("+", "-"), domain) if r["state"] == "complete"]
            best = max(rows, key=lambda r: (r["accuracy"], -r["training_time_seconds"]))
            spent = sum(r["device_seconds"] for r in rows)
            rank = 1 + sum(1 for v in grid_val.values() if v > grid_val.get(_key(best), best["accuracy"]))
            test = f"{best['test_accuracy']:.0%}" if best.get("test_accuracy") is not None else "—"
            lines.append(f"| {domain} | {strategy} | {len(rows)} of {len(grid_rows)} | {spent:.0f} | "
                         f"{spent / grid_seconds:.2f}x | {best['accuracy']:.0%} | {test} | {rank} of {len(grid_rows)} |")
        prediction = json.loads((home / "tuning" / "predict" / domain / "summary.json").read_text()).get("prediction")
        if prediction:
            pairs = ", ".join(f"{v['predicted']:.0%} → {v['measured']:.0%}" for v in prediction["verified"])
            lines.append(f"| {domain} | predict: surrogate | leave-one-out error {prediction['loo_mae']:.2f} | | | "
                         f"predicted → measured: {pairs} | | |")
    write_doc(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
