"""Does a base that has memorised small arithmetic tables let a LoRA learn the sum and difference domains?

    .venv/bin/python bench/arithmetic_transfer.py [--epochs 30] [--trial-epochs 16] [--domains legal supply-chain]

A cheap proxy for changing the `tiny` build, without rebuilding it: continue training the built-in
model (all weights) on its own corpus plus the complete tables `a + b =` and `a - b =` for 0..20 and
`a x b =` for 1..9, in one canonical chat form; report how much of the tables and of the fact probes
it then answers; then train one LoRA per domain on that base (r 16, all-linear, learning rate 3e-3,
the best kind of configuration in docs/domain-spread.md) and report validation per epoch and test on
its best epoch, side by side with the same trial on the shipped base.
Everything runs in a scratch home; nothing is kept.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, scratch_home  # noqa: E402


def tables() -> list[tuple[str, str]]:
    rows = [(f"{a} + {b} =", str(a + b)) for a in range(21) for b in range(21)]
    rows += [(f"{a} - {b} =", str(a - b)) for a in range(21) for b in range(a + 1)]
    return rows + [(f"{a} x {b} =", str(a * b)) for a in range(1, 10) for b in range(1, 10)]


def continue_training(model_dir: Path, out: Path, epochs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data import Example, tokenize_examples
    from loraforge.models.tiny import build

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    facts = [(q, f.answer) for f in build.corpus.facts() for q in f.phrasings]
    table = tables()
    examples = [Example(i + 1, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for i, (q, a) in enumerate(facts + table)]
    data = tokenize_examples(tokenizer, examples, max_seq_length=256, train_on_inputs=False, source="tables")
    batch_size = 32
    steps = epochs * -(-len(data) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    model.train()
    started = time.perf_counter()
    build.fit(model, data, tokenizer.pad_token_id, optimizer, schedule, epochs=epochs, batch_size=batch_size, seed=0)
    seconds = time.perf_counter() - started
    model.eval()
    sample = random.Random(1).sample(table, 120)
    answers = build.generate_answers(model, tokenizer, [q for q, _ in sample], max_new_tokens=6)
    stats = {"table_accuracy": sum(a == x for a, (_, x) in zip(answers, sample)) / len(sample),
             "fact_accuracy": build.probe_accuracy(model, tokenizer), "seconds": seconds,
             "facts": len(facts), "table": len(table)}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30, help="epochs of continued training on corpus + tables")
    parser.add_argument("--trial-epochs", type=int, default=16, help="epochs of each LoRA trial")
    parser.add_argument("--domains", nargs="+", default=["legal", "supply-chain"])
    args = parser.parse_args()
    home = scratch_home("loraforge-arith-")

    from loraforge.models.tiny import build
    from loraforge.tune.objective import domain_data, run_trial
    from loraforge.tune.spec import parse_tune_spec

    base = home / "tiny-tables"
    stats = continue_training(build.build(), base, args.epochs)
    print(f"`{command('arithmetic_transfer.py')}`")
    print(f"continued training: {stats['facts']} fact phrasings + {stats['table']} table rows, {args.epochs} epochs, "
          f"{stats['seconds']:.0f} s; tables answered {stats['table_accuracy']:.0%} (120 sampled rows), "
          f"fact probes {stats['fact_accuracy']:.0%}")
    for domain in args.domains:
        for label, model in (("shipped tiny", "tiny"), ("tiny + tables", str(base))):
            spec = parse_tune_spec({"name": "arith", "model": model, "domains": [domain], "strategy": "grid",
                                    "epochs": args.trial_epochs, "space": {"learning_rate": [3e-3]},
                                    "fixed": {"r": 16, "target_modules": "all-linear", "batch_size": 8}})
            outcome = run_trial(spec, {"learning_rate": 3e-3}, domain_data(spec, domain), work_dir=home / "trial")
            print(f"{domain} on {label}: validation by epoch {[round(a * 100) for a in outcome.epoch_accuracy]} %, "
                  f"best {outcome.accuracy:.0%}, test {outcome.test_accuracy:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
