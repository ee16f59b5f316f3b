"""How good is `loraforge validate`'s estimate? Predicted against measured peak memory and training time.

    .venv/bin/python bench/estimate_accuracy.py [--steps 8] [--out docs/estimate-accuracy.md] [--only N ...]
    .venv/bin/python bench/estimate_accuracy.py --config tiny,8,all,512,1,on,auto [--config ...] --out /tmp/x.md

A table of configurations on `tiny` and SmolLM2-135M-Instruct (r 8 and 64; attention-only and all linear
layers; max_seq_length 128 and 1024; micro-batch 1 and 4; gradient checkpointing on and off; the precision
loraforge picks on this CPU, and fp32 as on a CPU without native bf16). Rows 12-14 were added after the
estimate's CPU allocator terms were fitted, on configurations none of the fits used. Each runs in a fresh
process:

1. the estimate, as `loraforge validate` computes it (memory from the model's config; time from a
   calibration of the recipe, on a scratch store whose cache starts empty, as a first `validate` does);
2. a real training run of `--steps` optimizer steps with loraforge's recipe, in another fresh process:
   measured peak = the process's peak RSS (VmHWM) minus its RSS once torch, transformers and peft are
   imported (on a GPU: `torch.cuda.max_memory_allocated`); measured time = the training loop's seconds.

Predicted time is for the same steps (the planned tokens times the cached seconds per token); a row whose
`--steps` would train for under `--min-seconds` runs more steps, so that scheduling noise on a run of a
fraction of a second does not decide its error. The data
are generated records whose every example is close to `max_seq_length` tokens (the worst case the
estimate plans for).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, scratch_home, write_doc  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]
# (model, r, targets, max_seq_length, micro-batch, gradient checkpointing, precision)
TABLE = [
    ("tiny", 8, "attn", 128, 1, False, "auto"),
    ("tiny", 64, "all", 1024, 4, False, "auto"),
    ("tiny", 8, "all", 1024, 1, True, "auto"),
    ("smollm2-135m-instruct", 8, "attn", 128, 1, False, "auto"),
    ("smollm2-135m-instruct", 8, "attn", 128, 4, False, "auto"),
    ("smollm2-135m-instruct", 64, "all", 128, 4, False, "auto"),
    ("smollm2-135m-instruct", 8, "attn", 1024, 1, False, "auto"),
    ("smollm2-135m-instruct", 8, "all", 1024, 1, False, "auto"),
    ("smollm2-135m-instruct", 64, "all", 1024, 1, False, "auto"),
    ("smollm2-135m-instruct", 8, "all", 1024, 1, True, "auto"),
    ("smollm2-135m-instruct", 64, "attn", 512, 4, True, "auto"),
    ("smollm2-135m-instruct", 64, "attn", 384, 1, True, "fp32"),
    ("smollm2-135m-instruct", 8, "all", 512, 2, False, "fp32"),
    ("tiny", 64, "attn", 512, 4, True, "auto"),
]


def parse_row(text: str) -> tuple:
    """'tiny,8,all,512,1,on,auto' -> a table row."""
    parts = text.split(",")
    if len(parts) != 7 or parts[2] not in ("attn", "all") or parts[5] not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected model,r,attn|all,seq,micro-batch,on|off,precision")
    return (parts[0], int(parts[1]), parts[2], int(parts[3]), int(parts[4]), parts[5] == "on", parts[6])


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def records(tokenizer_dir: str, target_tokens: int, n: int) -> list[dict]:
    """`n` question/answer records, each rendered close to (not over) `target_tokens` tokens."""
    from transformers import AutoTokenizer

    from loraforge.data import render

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = ("the harbour of Varenholt keeps a lighthouse painted in red spirals and a market older than "
             "its charter where glassblowers trade with salt farmers every week of the year").split()

    def messages(i: int, count: int) -> list[dict]:
        answer = " ".join(words[(k + i) % len(words)] for k in range(count))
        return [{"role": "user", "content": f"Tell me about place number {i}."},
                {"role": "assistant", "content": answer}]

    def length(i: int, count: int) -> int:
        return len(tok(render(tok, messages(i, count), add_generation_prompt=False),
                       add_special_tokens=False)["input_ids"])

    low, high = 1, target_tokens  # the most words that keep record 0 within 8 tokens of the target
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if length(0, mid) <= target_tokens - 8 else (low, mid - 1)
    counts = []
    for i in range(n):  # the words rotate with i and tokenize differently: trim any record over the target
        count = low
        while count > 1 and length(i, count) > target_tokens:
            count -= 1
        counts.append(count)
    return [{"messages": messages(i, count)} for i, count in enumerate(counts)]


def config_of(row, steps: int) -> dict:
    model, r, targets, seq, batch, ckpt, precision = row
    return {"name": "estimate-bench", "model_name": model, "r": r, "lora_alpha": 2 * r, "precision": precision,
            "target_modules": ATTN if targets == "attn" else ALL, "max_seq_length": seq, "batch_size": batch,
            "gradient_accumulation_steps": 1, "gradient_checkpointing": ckpt, "max_steps": steps,
            "learning_rate": 1e-4, "save_steps": 0, "logging_steps": 1}


def child(row_json: str, steps: int, mode: str) -> None:
    """One configuration, in this fresh process: `estimate` prints the prediction, `measure` trains."""
    import torch  # noqa: F401  (the baseline includes the libraries)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from loraforge.config import parse_train_config
    from loraforge.data import load_examples, tokenize_examples
    from loraforge.models.resolve import model_folder
    from loraforge.train.plan import plan_training

    row = json.loads(row_json)
    plan = plan_training(parse_train_config(config_of(row, steps), source="bench"))
    folder = model_folder(plan.model)
    examples = load_examples(records(folder, row[3], 4 * row[4] * steps), "bench")
    if mode == "estimate":
        from transformers import AutoTokenizer

        from loraforge.train.calibrate import estimate_time
        from loraforge.train.estimate import for_plan

        data = tokenize_examples(AutoTokenizer.from_pretrained(folder), examples,
                                 max_seq_length=plan.max_seq_length, train_on_inputs=False)
        estimate, _, settings = for_plan(plan, data=data)
        timing = estimate_time(plan, examples, data, measure=True)
        print("RESULT " + json.dumps({"peak_bytes": estimate.total, "terms": estimate.terms, "precision": settings.precision,
                                      "seconds": timing.get("seconds"), "calibrated": timing.get("calibrated")}))
        return
    import torch

    from loraforge.train.recipe import train

    baseline = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to now
    with tempfile.TemporaryDirectory() as tmp:
        result = train(plan, examples, run_dir=Path(tmp) / "run", out_dir=Path(tmp) / "out", log=lambda m: None)
    measured = (rss_kb("VmHWM") - baseline) * 1024
    if torch.cuda.is_available() and plan.spec.training.device != "cpu":
        measured = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps({"peak_bytes": measured, "seconds": result.manifest["training"]["seconds"],
                                  "steps": result.steps}))


def run_child(row, steps: int, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(row), "--mode", mode, "--steps", str(steps)],
                         capture_output=True, text=True, env={**os.environ, "LORAFORGE_PRECISION": ""})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"child failed for {row} ({mode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def mb(n: float) -> str:
    return f"{n / 2**20:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=5.0,
                        help="more steps for a row whose --steps would train for less (timer noise)")
    parser.add_argument("--out", default="docs/estimate-accuracy.md")
    parser.add_argument("--only", type=int, nargs="*", help="row numbers of the table (1-based)")
    parser.add_argument("--config", action="append", type=parse_row, default=[],
                        help="a configuration outside the table: model,r,attn|all,seq,micro-batch,on|off,precision")
    parser.add_argument("--child")
    parser.add_argument("--mode")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.mode)
        return 0
    from loraforge.device import cpu_description

    scratch_home("loraforge-estimate-")  # an empty calibration cache: every row calibrates as a first run would
    # (number, row): the table's rows named by --only (all of them when neither option is given), then --config's
    picked = [(i, TABLE[i - 1]) for i in args.only] if args.only else [] if args.config else list(enumerate(TABLE, 1))
    picked += [(f"c{i}", row) for i, row in enumerate(args.config, 1)]
    lines = ["# Estimate accuracy: predicted against measured peak memory and training time", "",
             f"Command: `{command('estimate_accuracy.py')}`  ", f"CPU: {cpu_description()}, {os.cpu_count()} cores; "
             f"{args.steps} optimizer steps per run, more where that trains for under {args.min_seconds:g} s (timer "
             "noise); memory = peak RSS above the process's RSS after imports.", "",
             "| # | model | r | layers | seq | micro-batch | checkpointing | precision | steps | predicted MB "
             "| measured MB | error | predicted s | measured s | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst_mem = worst_time = 0.0
    for index, row in picked:
        steps = args.steps
        predicted = run_child(row, steps, "estimate")
        if predicted.get("seconds") and predicted["seconds"] < args.min_seconds:  # the calibration is cached now
            steps = math.ceil(steps * args.min_seconds / max(predicted["seconds"], 0.05))
            predicted = run_child(row, steps, "estimate")
        measured = run_child(row, steps, "measure")
        mem_err = predicted["peak_bytes"] / measured["peak_bytes"] - 1
        time_err = predicted["seconds"] / measured["seconds"] - 1 if predicted.get("seconds") else float("nan")
        worst_mem, worst_time = max(worst_mem, abs(mem_err)), max(worst_time, abs(time_err))
        model, r, targets, seq, batch, ckpt, _ = row
        lines.append(f"| {index} | {model} | {r} | {targets} | {seq} | {batch} | {'on' if ckpt else 'off'} | "
                     f"{predicted['precision']} | {steps} | "
                     f"{mb(predicted['peak_bytes'])} | {mb(measured['peak_bytes'])} | {mem_err:+.1%} | "
                     f"{predicted['seconds']:.1f} | {measured['seconds']:.1f} | {time_err:+.1%} |")
        print(lines[-1], flush=True)
        print("   terms MB: " + ", ".join(f"{k} {mb(v)}" for k, v in predicted["terms"].items()), flush=True)
    lines += ["", f"Largest error: memory {worst_mem:.1%} (bar 15%), time {worst_time:.1%} (bar 25%)."]
    write_doc(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
