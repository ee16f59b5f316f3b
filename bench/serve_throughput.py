"""Serving throughput: continuous batching against one request at a time, side by side, on a real server.

    .venv/bin/python bench/serve_throughput.py [--model smollm2-135m-instruct] [--clients 1 4 16]
        [--requests 4] [--max-tokens 64] [--adapters 4] [--out docs/serve-throughput.md]

One store, `--adapters` adapters trained on the model first (2 steps each through the server: their
weights are not the point, their being distinct adapters on one base is). Then for each setting, a
fresh `loraforge serve` process (`--max-batch 16`, batching; `--max-batch 1`, one request at a time,
what a server without batching does) and, for each client count, every client sends `--requests`
chat completions one after another, cycling through the base and the adapters, each generating
exactly `--max-tokens` tokens (`ignore_eos`, vLLM's parameter) so both settings do the same work.
Measured: generated tokens per second over the whole run, each request's latency (median and 95th
percentile), and the server's own count of how many rows its decode steps carried (mean batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "src"))

from _home import command, write_doc  # noqa: E402

PROMPTS = ["What is the capital of France?", "Explain photosynthesis in two sentences.",
           "Give me three tips for learning a language.", "What does a compiler do?",
           "Why is the sky blue?", "Write a haiku about rain."]
DATA = [{"instruction": f"What is code word {i}?", "output": f"Code word {i} is banana{i}."} for i in range(8)]


class Server:
    def __init__(self, home: Path, port: int, *args: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(home / f"serve-{port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", "--port", str(port),
                                      "--log-level", "warning", *args],
                                     env={**os.environ, "LORAFORGE_HOME": str(home)}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def train_adapters(server: Server, model: str, count: int) -> list[str]:
    names = []
    with httpx.Client(base_url=server.url, timeout=600) as c:
        for i in range(count):
            name = f"bench-{i}"
            config = {"model_name": model, "output_dir": f"./adapters/{name}", "training_data": DATA,
                      "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                      "training_config": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 2,
                                          "warmup_steps": 0}}
            job = c.post("/api/training/start", json=config).json()["job_id"]
            while (state := c.get(f"/api/training/jobs/{job}").json())["status"] in ("queued", "running"):
                time.sleep(1)
            if state["status"] != "succeeded":
                raise RuntimeError(f"training {name} failed: {state}")
            names.append(name)
    return names


def run_load(server: Server, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    answers: dict[tuple[str, str], set[str]] = {}
    tokens = 0
    lock = threading.Lock()
    errors: list[str] = []

    def client(index: int) -> None:
        nonlocal tokens
        with httpx.Client(base_url=server.url, timeout=600) as c:
            for j in range(requests):
                k = index * requests + j
                model, prompt = models[k % len(models)], PROMPTS[k % len(PROMPTS)]
                started = time.perf_counter()
                r = c.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": max_tokens, "ignore_eos": True,
                    "messages": [{"role": "user", "content": prompt}]})
                elapsed = time.perf_counter() - started
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    latencies.append(elapsed)
                    tokens += r.json()["usage"]["completion_tokens"]
                    answers.setdefault((model, prompt), set()).add(r.json()["choices"][0]["message"]["content"])

    before = _stats(server)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = _stats(server)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    latencies.sort()
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)],
            "mean_batch": rows / steps if steps else 0.0, "answers": answers}


def _stats(server: Server) -> dict:
    bases = httpx.get(server.url + "/api/serving", timeout=30).json()["bases"]
    return {"decode_steps": sum(b["decode_steps"] for b in bases), "rows_decoded": sum(b["rows_decoded"] for b in bases)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve-throughput.md"))
    args = parser.parse_args()

    from loraforge import paths

    home = Path(tempfile.mkdtemp(prefix="loraforge-serve-bench-"))
    models_dir = paths.home() / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    port = 5300
    trainer = Server(home, port, "--max-jobs", "1")
    try:
        adapters = train_adapters(trainer, args.model, args.adapters)
    finally:
        trainer.stop()
    models = [args.model] + adapters
    results: dict[tuple[str, int], dict] = {}
    for setting, max_batch in (("batched (--max-batch 16)", 16), ("one at a time (--max-batch 1)", 1)):
        port += 1
        server = Server(home, port, "--max-batch", str(max_batch), "--max-queued", "256")
        try:
            run_load(server, models, 1, 1, 8)  # warm-up: loads the base and every adapter's first use
            for name in adapters:
                run_load(server, [name], 1, 1, 4)
            for clients in args.clients:
                results[(setting, clients)] = r = run_load(server, models, clients, args.requests, args.max_tokens)
                print(f"{setting:32} {clients:3} clients: {r['tokens_per_s']:7.1f} tok/s, p50 {r['p50_s']:.2f} s, "
                      f"mean batch {r['mean_batch']:.1f}", flush=True)
        finally:
            server.stop()

    import torch

    lines = ["# Serving throughput: continuous batching vs one request at a time", "",
             f"Command: `{command('serve_throughput.py')}`", "",
             f"Model `{args.model}` with {len(adapters)} adapters on it; each client sends {args.requests} requests "
             f"in turn, cycling through the base and the adapters ({len(models)} models), each generating "
             f"exactly {args.max_tokens} tokens. torch {torch.__version__}, {os.cpu_count()} CPU cores, "
             f"{torch.get_num_threads()} threads.", "",
             "| clients | batched tok/s | one-at-a-time tok/s | speed-up | batched p50 / p95 s | "
             "one-at-a-time p50 / p95 s | mean rows per decode step |", "|---:|---:|---:|---:|---:|---:|---:|"]
    batched, single = ("batched (--max-batch 16)", "one at a time (--max-batch 1)")
    for clients in args.clients:
        b, s = results[(batched, clients)], results[(single, clients)]
        lines.append(f"| {clients} | {b['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
                     f"{b['tokens_per_s'] / s['tokens_per_s']:.2f}x | {b['p50_s']:.2f} / {b['p95_s']:.2f} | "
                     f"{s['p50_s']:.2f} / {s['p95_s']:.2f} | {b['mean_batch']:.1f} |")
    solo: dict = {}
    for clients in args.clients:
        for key, texts in results[(single, clients)]["answers"].items():
            solo.setdefault(key, set()).update(texts)
    checked = same = 0
    for clients in args.clients:
        for key, texts in results[(batched, clients)]["answers"].items():
            if key in solo:
                checked += 1
                same += texts == solo[key] and len(texts) == 1
    lines += ["", f"Greedy answers, batched vs one at a time: {same} of {checked} (model, prompt, client count) "
                  "pairs identical token for token.", "",
              "Raw: `" + json.dumps({f"{k[0]} x{k[1]}": {n: round(v, 3) for n, v in r.items() if n != "answers"}
                                    for k, r in results.items()}) + "`"]
    write_doc(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
