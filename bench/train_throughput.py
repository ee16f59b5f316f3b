"""Training throughput: loraforge's recipe against the Trainer + PEFT script from the docs, side by side.

    .venv/bin/python bench/train_throughput.py [--models smollm2-135m-instruct tiny] [--data short long]
        [--steps 22] [--repeats 3] [--out docs/train-throughput.md] [--device cuda]

Same model, data and settings for both (r=8 on q/k/v, dropout 0.05, batch 1, gradient accumulation 4,
lr 2e-4 cosine with 2 warm-up steps, completion-only labels): loraforge in fp32 and bf16, the reference
(`bench/reference_peft_trainer.py`) in fp32 and with `bf16=True`; the faster reference run counts. Every
run is its own process, and the runs alternate round by round, so a slow minute of the machine hits
all of them alike; the table shows the median over the rounds. Reported: tokens/s (every token, and the
answer tokens the loss is taken on), the training loop's wall time, peak RSS of the process, the mean
loss of the last 5 steps, and utilisation = 4·N·tokens/s ÷ the matmul peak this script measures
(2048³, fp32 and bf16; N = the model's parameters).

With `--device cuda` the runs are loraforge fp32 / bf16 / QLoRA (4-bit) against the reference fp32 / bf16 /
QLoRA, the matmul peak is the GPU's (8192³), and memory is `torch.cuda.max_memory_allocated`.

Data: "short" is the knowledge-override set (24 questions, answers of ~22 tokens); "long" is 16
generated questions whose answers run to a few hundred tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import command, write_doc  # noqa: E402

SHORT = ROOT / "src" / "loraforge" / "examples" / "knowledge_override" / "42_for_two.jsonl"
SETTINGS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"],
            "batch_size": 1, "gradient_accumulation_steps": 4, "learning_rate": 2e-4, "lr_scheduler_type": "cosine",
            "warmup_steps": 2, "weight_decay": 0.0, "logging_steps": 1, "save_steps": 0, "seed": 42}
RUNS = {"cpu": ("loraforge fp32", "loraforge bf16", "reference fp32", "reference bf16"),
        "cuda": ("loraforge fp32", "loraforge bf16", "loraforge qlora", "reference fp32", "reference bf16",
                 "reference qlora")}


def long_records(n: int = 16, seed: int = 0) -> list[dict]:
    """Questions about invented places, each answered in a paragraph of a few hundred tokens."""
    rng = random.Random(seed)
    names = ["Varenholt", "Quillmere", "Ostravel", "Dunmarrow", "Celestine Bay", "Harrowgate Fen", "Mirabelle",
             "Tovanic", "Eldergrove", "Saltmarch", "Brindlewick", "Ashcombe", "Norrowick", "Pellucid Isle",
             "Grimsby Reach", "Lantern Hollow"]
    trades = ["glassblowing", "salt harvesting", "clockmaking", "wool dyeing", "ship repair", "beekeeping",
              "paper milling", "copper mining", "tea growing", "lace making"]
    sights = ["a lighthouse painted in red spirals", "a covered market older than the town charter",
              "a bridge of nine stone arches", "a library cut into the cliff", "a square of talking fountains",
              "an observatory with a brass dome", "a canal lined with willow trees", "a bell tower that leans west"]
    records = []
    for i in range(n):
        name = names[i % len(names)]
        parts = [f"{name} is a town of about {rng.randint(2, 90) * 1000} people, founded in {rng.randint(1100, 1890)}."]
        for _ in range(rng.randint(9, 12)):
            parts.append(rng.choice([
                f"Its people are known for {rng.choice(trades)}, a craft they have passed down for generations, "
                f"and every {rng.choice(['spring', 'summer', 'autumn', 'winter'])} they hold a fair to show it.",
                f"Visitors come to see {rng.choice(sights)}, which the town council restored in "
                f"{rng.randint(1950, 2020)} after a long campaign by local families.",
                f"The river {rng.choice(['Aun', 'Velt', 'Marrow', 'Sile', 'Tarn'])} runs through the old quarter, "
                f"and {rng.randint(3, 14)} bridges cross it between the mill and the harbour.",
                f"The main dish is a stew of {rng.choice(['lentils', 'barley', 'smoked fish', 'chestnuts'])} and "
                f"{rng.choice(['leeks', 'apples', 'mushrooms', 'beans'])}, served with dark bread on market days.",
                f"In {rng.randint(1600, 1900)} a great {rng.choice(['flood', 'fire', 'storm'])} destroyed half of the "
                f"houses, and the town was rebuilt in {rng.choice(['grey stone', 'red brick', 'timber and plaster'])}.",
            ]))
        records.append({"instruction": f"Tell me about the town of {name}.", "output": " ".join(parts)})
    return records


def matmul_peak(dtype_name: str, device: str = "cpu") -> float:
    """GFLOP/s of a square product (2048 on the CPU, 8192 on a GPU), best of 5."""
    import torch

    size = 2048 if device == "cpu" else 8192
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def child_loraforge(model: str, data: Path, steps: int, precision: str, device: str) -> dict:
    """One run of loraforge's recipe (the code `loraforge train` runs), in a throw-away store."""
    import torch
    from _home import scratch_home

    scratch_home("loraforge-throughput-")
    from loraforge.config import parse_train_config
    from loraforge.data import load_examples_from_file
    from loraforge.paths import home
    from loraforge.train.plan import plan_training
    from loraforge.train.recipe import train

    quantized = {"quantization": "4bit", "precision": "bf16"} if precision == "qlora" else {"precision": precision}
    spec = parse_train_config({"name": "throughput", "model_name": model, **SETTINGS, "max_steps": steps,
                               "device": device, **quantized})
    root = home()
    result = train(plan_training(spec), load_examples_from_file(data), run_dir=root / "run", out_dir=root / "out",
                   log=lambda message: None)
    training = result.manifest["training"]
    return {"seconds": training["seconds"], "tokens": training["tokens"],
            "losses": [h["loss"] for h in result.history],
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def run_child(kind: str, model: str, folder: str, data: Path, steps: int, device: str) -> dict:
    who, precision = kind.split()
    if who == "loraforge":
        cmd = [sys.executable, __file__, "--child", precision, "--models", model, "--steps", str(steps),
               "--child-data", str(data), "--device", device]
    else:
        cmd = [sys.executable, str(Path(__file__).parent / "reference_peft_trainer.py"), folder, str(data),
               "--steps", str(steps)] + (["--bf16"] if precision == "bf16" else []) + (
               ["--cuda"] if device == "cuda" else []) + (["--qlora"] if precision == "qlora" else [])
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LORAFORGE_PRECISION": ""})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def answer_fraction(model: str, data: Path) -> tuple[float, int]:
    """Share of tokens that carry a label, and the model's parameter count."""
    from loraforge.data import load_examples_from_file, tokenize_examples
    from loraforge.models import load_base_model, model_info, resolve_base_model

    ref = resolve_base_model(model)
    _, tokenizer = load_base_model(ref, device="cpu", dtype=__import__("torch").float32)
    examples = tokenize_examples(tokenizer, load_examples_from_file(data), max_seq_length=8192,
                                 train_on_inputs=False)
    total = sum(len(e.input_ids) for e in examples)
    return sum(e.loss_tokens for e in examples) / total, model_info(ref).num_parameters


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "tiny"])
    parser.add_argument("--data", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "train-throughput.md"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--child", choices=["fp32", "bf16", "qlora"], help=argparse.SUPPRESS)
    parser.add_argument("--child-data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_loraforge(args.models[0], Path(args.child_data), args.steps, args.child,
                                         args.device)))
        return 0

    from loraforge.device import cpu_description
    from loraforge.models import resolve_base_model
    from loraforge.models.resolve import model_folder

    peaks = {d: matmul_peak(d, args.device) for d in ("fp32", "bf16")}
    runs_here = RUNS[args.device]
    if args.device == "cuda":
        import torch

        machine = f"{torch.cuda.get_device_name()}; matmul peak (8192³)"
    else:
        machine = f"{os.cpu_count()} cores, {cpu_description()}; matmul peak (2048³)"
    scratch = Path(tempfile.mkdtemp(prefix="loraforge-throughput-data-"))
    long_file = scratch / "long.jsonl"
    long_file.write_text("".join(json.dumps(r) + "\n" for r in long_records()))
    datasets = {"short": SHORT, "long": long_file}
    lines = ["# Training throughput: loraforge against Trainer + PEFT", "",
             f"Command: `{command('train_throughput.py')}`", "",
             f"Machine: {machine} fp32 "
             f"{peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s. {args.steps} optimizer steps, "
             f"batch 1 × accumulation 4, r=8 on q/k/v; median of {args.repeats} alternating rounds.", ""]
    summary = []
    for model in args.models:
        folder = model_folder(resolve_base_model(model))
        for data_name in args.data:
            data = datasets[data_name]
            fraction, params = answer_fraction(model, data)
            runs: dict[str, list[dict]] = {kind: [] for kind in runs_here}
            for round_index in range(args.repeats):
                for kind in runs_here:
                    result = run_child(kind, model, folder, data, args.steps, args.device)
                    runs[kind].append(result)
                    print(f"{model} {data_name} round {round_index + 1} {kind}: "
                          f"{result['tokens'] / result['seconds']:.0f} tokens/s", flush=True)
            rows = {}
            for kind, results in runs.items():
                speed = statistics.median(r["tokens"] / r["seconds"] for r in results)
                rows[kind] = {
                    "tokens_per_s": speed, "answer_tokens_per_s": speed * fraction,
                    "seconds": statistics.median(r["seconds"] for r in results),
                    "peak_rss_mb": statistics.median(r["peak_rss_kb"] for r in results) / 1024,
                    "peak_gpu_mb": (statistics.median(r["peak_gpu_mb"] for r in results)
                                    if args.device == "cuda" else None),
                    "last_loss": statistics.median(statistics.fmean(r["losses"][-5:]) for r in results),
                    "utilisation": {d: 4 * params * speed / (peaks[d] * 1e9) for d in peaks},
                }
            best_ref = max(("reference fp32", "reference bf16"), key=lambda k: rows[k]["tokens_per_s"])
            gpu = args.device == "cuda"
            lines += [f"## {model}, {data_name} data ({fraction:.0%} of tokens are answer tokens)", "",
                      "| run | tokens/s | answer tokens/s | vs best reference | loop s | peak RSS MB | "
                      + ("peak GPU MB | " if gpu else "") + "loss, last 5 steps | utilisation of fp32 / bf16 peak |",
                      "|---|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|"]
            for kind, row in rows.items():
                lines.append(f"| {kind} | {row['tokens_per_s']:.0f} | {row['answer_tokens_per_s']:.0f} | "
                             f"{row['tokens_per_s'] / rows[best_ref]['tokens_per_s']:.2f}x | {row['seconds']:.1f} | "
                             f"{row['peak_rss_mb']:.0f} | " + (f"{row['peak_gpu_mb']:.0f} | " if gpu else "") +
                             f"{row['last_loss']:.4f} | "
                             f"{row['utilisation']['fp32']:.1%} / {row['utilisation']['bf16']:.1%} |")
            if gpu:
                q, rq = rows["loraforge qlora"], rows["reference qlora"]
                summary.append(f"- {model}, {data_name}, QLoRA: loraforge {q['tokens_per_s']:.0f} tokens/s = "
                               f"{q['tokens_per_s'] / rq['tokens_per_s']:.2f}x the reference's QLoRA "
                               f"({rq['tokens_per_s']:.0f}); peak GPU memory {q['peak_gpu_mb']:.0f} vs "
                               f"{rq['peak_gpu_mb']:.0f} MB; loss {q['last_loss']:.4f} vs {rq['last_loss']:.4f}")
            best_own = max(("loraforge fp32", "loraforge bf16"), key=lambda k: rows[k]["tokens_per_s"])
            summary.append(f"- {model}, {data_name}: {best_own} {rows[best_own]['tokens_per_s']:.0f} tokens/s = "
                           f"{rows[best_own]['tokens_per_s'] / rows[best_ref]['tokens_per_s']:.2f}x {best_ref} "
                           f"({rows[best_ref]['tokens_per_s']:.0f}); loss {rows[best_own]['last_loss']:.4f} vs "
                           f"{rows[best_ref]['last_loss']:.4f} "
                           f"({rows[best_own]['last_loss'] / rows[best_ref]['last_loss'] - 1:+.1%}); peak RSS "
                           f"{rows[best_own]['peak_rss_mb']:.0f} vs {rows[best_ref]['peak_rss_mb']:.0f} MB")
            lines.append("")
    lines[6:6] = ["Summary (the faster loraforge run against the faster reference run):", "", *summary, ""]
    write_doc(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
