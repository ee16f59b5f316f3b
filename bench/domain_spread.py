"""Per-domain spread on the built-in model: best, median and worst test accuracy over a small LoRA grid.

    .venv/bin/python bench/domain_spread.py [--domains financial legal ...] [--out docs/domain-spread.md]

For every domain: train one adapter per grid point on the train split (64 tasks), score exact match on
the test split (32 tasks), greedy. The grid is small on purpose (the tuner explores; this measures
whether there is anything to tune): learning rate x rank x target modules.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import scratch_home  # noqa: E402
GRID = {"learning_rate": [3e-4, 3e-3], "r": [4, 16], "target_modules": [["q_proj", "v_proj"], "all-linear"]}
EPOCHS = 8


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", nargs="+")
    parser.add_argument("--out", default=str(ROOT / "docs" / "domain-spread.md"))
    args = parser.parse_args()

    scratch_home("loraforge-spread-")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.config import parse_train_config
    from loraforge.data import load_examples
    from loraforge.generation import batch_generate
    from loraforge.models.tiny import build
    from loraforge.pipeline import train_into_store
    from loraforge.store import Store
    from loraforge.train.plan import plan_training
    from loraforge.tune.domains import DOMAINS, accuracy, splits

    model_dir = build.build()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    store = Store()
    domains = args.domains or sorted(DOMAINS)
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    started = time.perf_counter()
    rows = []
    for domain in domains:
        data = splits(domain, seed=0)
        records = [{"instruction": t.prompt, "output": t.answer} for t in data["train"]]
        chats = [[{"role": "user", "content": t.prompt}] for t in data["test"]]
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        base_acc = accuracy(data["test"], [o[0] for o in batch_generate(base, tokenizer, chats, max_tokens=16)])
        scores = []
        for index, (lr, r, targets) in enumerate(itertools.product(*GRID.values())):
            spec = parse_train_config({
                "model_name": "tiny", "name": f"{domain}-{index}", "r": r, "lora_alpha": 2 * r,
                "target_modules": linear if targets == "all-linear" else targets, "learning_rate": lr,
                "num_epochs": EPOCHS, "batch_size": 8, "warmup_ratio": 0.1, "lora_dropout": 0.0,
                "device": "cpu"}, source="grid")
            version, _ = train_into_store(store, plan_training(spec), load_examples(records, domain),
                                          run_id=f"spread-{domain}-{index}", log=lambda m: None)
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                              str(version.path)).eval()
            outputs = [o[0] for o in batch_generate(model, tokenizer, chats, max_tokens=16)]
            scores.append(accuracy(data["test"], outputs))
            del model
        rows.append((domain, base_acc, max(scores), statistics.median(scores), min(scores)))
        print(rows[-1], flush=True)
    seconds = time.perf_counter() - started
    grid = ", ".join(f"{k} {v}" for k, v in GRID.items())
    lines = [f"Test accuracy (exact match, 32 tasks, greedy) on the built-in model after LoRA on 64 training "
             f"tasks, {EPOCHS} epochs, over the grid {grid} ({len(list(itertools.product(*GRID.values())))} "
             f"configs). Measured by `{' '.join(['.venv/bin/python', 'bench/domain_spread.py'] + sys.argv[1:])}` "
             f"in {seconds:.0f} s.", "",
             "| domain | base | best | median | worst |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {d} | {b:.0%} | {hi:.0%} | {mid:.0%} | {lo:.0%} |" for d, b, hi, mid, lo in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
