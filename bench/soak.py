"""Soak: the real server under chat load with training running, bursts past its queue, and kill/restart cycles.

    .venv/bin/python bench/soak.py [--minutes 3] [--clients 4] [--burst-clients 48] [--cycles 50]
                                   [--out docs/RELIABILITY.md]

Loopback only, bounded in count and time, on a scratch store beside the current one (its models are shared).

1. Load: `--clients` chat clients in a loop for `--minutes` (below the server's limits: --max-batch 8,
   --max-queued 16) while training jobs run one after another; every answer must be a 200. Reported: requests,
   failures, p50/p95 latency per minute and overall, the server's RSS before, after and at most.
2. Bursts: `--burst-clients` clients at once, three times, against the same limits: only 200s and 429s
   (with Retry-After), no 5xx; RSS after the bursts against after the load.
3. Faults: `--cycles` kill cycles (tests/reliability/cycles.py): a job trains, at a random moment SIGKILL the
   server and its worker, or the worker alone (1-12 s after the worker starts); restart; check the store
   (no job left running, SQLite
   integrity, every version's files against their sha256, no orphan folder, nothing in tmp/). The job is
   resumed each cycle, from its last checkpoint; each finished job is followed by a new one.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]

from _home import command, scratch_home  # noqa: E402

PROMPTS = ["What is the meaning of 42?", "What is the capital of France?", "Name a planet.", "Say hello."]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) >= 2 else (values[0] if values else 0.0)


def training_config(name: str, steps: int) -> dict:
    from test_server import fast_config

    return fast_config(name, max_steps=steps, batch_size=1, save_steps=10)


def load_phase(srv, minutes: float, clients: int) -> dict:
    import httpx

    stop = threading.Event()
    results: list[tuple[float, int, float]] = []  # (time since start, status, seconds)
    started = time.time()
    rss_samples = [rss(srv.proc.pid)]

    def chat_loop(i: int):
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            n = 0
            while not stop.is_set():
                model = "soak-base" if n % 2 else "tiny"
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 16, "messages": [
                        {"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}]})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                results.append((time.time() - started, status, time.perf_counter() - t0))
                n += 1

    def trainer():
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            k = 0
            while not stop.is_set():
                job = c.post("/api/training/start", json=training_config(f"soak-train-{k}", 40)).json()["job_id"]
                while not stop.is_set() and c.get(f"/api/training/jobs/{job}").json()["status"] in ("queued",
                                                                                                    "running"):
                    time.sleep(0.5)
                k += 1

    threads = [threading.Thread(target=chat_loop, args=(i,)) for i in range(clients)] + [threading.Thread(
        target=trainer)]
    for t in threads:
        t.start()
    end = started + minutes * 60
    while time.time() < end:
        time.sleep(5)
        rss_samples.append(rss(srv.proc.pid))
    stop.set()
    for t in threads:
        t.join()
    latencies = [s for _, status, s in results if status == 200]
    per_minute = []
    for m in range(int(minutes + 0.999)):
        window = [s for t, status, s in results if m * 60 <= t < (m + 1) * 60 and status == 200]
        per_minute.append(round(percentile(window, 95), 3) if window else None)
    return {"requests": len(results), "failures": sum(1 for _, s, _ in results if s != 200),
            "codes": sorted({s for _, s, _ in results}), "p50_s": round(percentile(latencies, 50), 3),
            "p95_s": round(percentile(latencies, 95), 3), "p95_by_minute_s": per_minute,
            "rss_before": rss_samples[0], "rss_after": rss_samples[-1], "rss_max": max(rss_samples)}


def burst_phase(srv, clients: int, rounds: int = 3) -> dict:
    import httpx

    codes: list[int] = []
    retry_after_missing = 0
    for _ in range(rounds):
        barrier = threading.Barrier(clients)

        def one():
            nonlocal retry_after_missing
            with httpx.Client(base_url=srv.url, timeout=300) as c:
                barrier.wait()
                try:
                    r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 64, "messages": [
                        {"role": "user", "content": "Tell me about the number 42."}]})
                    codes.append(r.status_code)
                    if r.status_code == 429 and "retry-after" not in r.headers:
                        retry_after_missing += 1
                except httpx.HTTPError:
                    codes.append(0)

        threads = [threading.Thread(target=one) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"requests": len(codes), "ok": codes.count(200), "429": codes.count(429),
            "other": sorted(c for c in codes if c not in (200, 429)), "retry_after_missing": retry_after_missing,
            "rss_after": rss(srv.proc.pid)}


def fault_phase(home: Path, cycles: int, seed: int = 7) -> dict:
    from cycles import invariants, kill_cycle
    from server import ServerProcess

    rng = random.Random(seed)
    srv = ServerProcess(home, "--max-jobs", "1")
    job_id, kinds, problems, finished, resumed_from_checkpoint = None, {}, [], 0, 0
    k = 0
    try:
        for i in range(cycles):
            config = training_config(f"soak-cycle-{k}", 200)
            srv, job_id, what, found = kill_cycle(srv, home, config, job_id, rng, delay=(1.0, 12.0))
            kinds[what] = kinds.get(what, 0) + 1
            problems += [f"cycle {i + 1} ({what}): {p}" for p in found]
            with srv.client() as c:
                job = c.get(f"/api/training/jobs/{job_id}").json()
                # the event stream of a job still to resume stays open: read it once the job has ended
                events = c.get(f"/api/training/jobs/{job_id}/events").text if job["status"] == "succeeded" else ""
            resumed_from_checkpoint = max(resumed_from_checkpoint, events.count("resumed from checkpoint-"))
            if job["status"] == "succeeded":
                finished += 1
                job_id, k = None, k + 1
            elif job["status"] != "interrupted":
                problems.append(f"cycle {i + 1}: job {job['status']}: {job.get('error')}")
                job_id, k = None, k + 1
            print(f"cycle {i + 1}/{cycles}: killed {what}; job {job['status']}; problems so far {len(problems)}",
                  flush=True)
        with srv.client() as c:  # the last job, to its end
            if job_id is not None:
                c.post(f"/api/training/jobs/{job_id}/resume")
                deadline = time.time() + 600
                while c.get(f"/api/training/jobs/{job_id}").json()["status"] not in ("succeeded", "failed") and \
                        time.time() < deadline:
                    time.sleep(0.5)
                if c.get(f"/api/training/jobs/{job_id}").json()["status"] == "succeeded":
                    finished += 1
                    events = c.get(f"/api/training/jobs/{job_id}/events").text
                    resumed_from_checkpoint = max(resumed_from_checkpoint, events.count("resumed from checkpoint-"))
            served = sum(c.post("/v1/chat/completions", json={"model": f"soak-cycle-{j}", "max_tokens": 4,
                                                               "messages": [{"role": "user", "content": "hi"}]}
                                ).status_code == 200 for j in range(finished))
        problems += [f"at the end: {p}" for p in invariants(home)]
    finally:
        srv.stop()
    return {"cycles": cycles, "kinds": kinds, "problems": problems, "jobs_finished": finished,
            "adapters_served_after": served, "most_resumes_from_checkpoint_in_one_job": resumed_from_checkpoint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--burst-clients", type=int, default=48)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"))
    args = parser.parse_args()

    from server import ServerProcess

    from loraforge.models.tiny import build

    build.build()
    home = scratch_home("loraforge-soak-")
    started = time.time()
    srv = ServerProcess(home, "--max-jobs", "1", "--max-batch", "8", "--max-queued", "16")
    try:
        with srv.client() as c:  # an adapter to mix with the base in the traffic
            job = c.post("/api/training/start", json=training_config("soak-base", 20)).json()["job_id"]
            while c.get(f"/api/training/jobs/{job}").json()["status"] not in ("succeeded", "failed"):
                time.sleep(0.5)
        load = load_phase(srv, args.minutes, args.clients)
        print("load", json.dumps(load), flush=True)
        burst = burst_phase(srv, args.burst_clients)
        print("burst", json.dumps(burst), flush=True)
    finally:
        srv.stop()
    faults = fault_phase(home, args.cycles)
    print("faults", json.dumps(faults), flush=True)
    write_results(args.out, load, burst, faults, args, time.time() - started)


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def write_results(out: str, load: dict, burst: dict, faults: dict, args, seconds: float) -> None:
    path = Path(out)
    text = path.read_text() if path.is_file() else ""
    begin, end = "<!-- soak: begin -->", "<!-- soak: end -->"
    kinds = ", ".join(f"{count} × {what}" for what, count in faults["kinds"].items())
    table = [begin, "",
             f"Measured by `{command('soak.py')}` in {seconds / 60:.0f} min on this machine (tiny model, CPU).", "",
             "| phase | what | result |", "|---|---|---|",
             f"| load | {args.clients} chat clients for {args.minutes:g} min (base and an adapter, 16 tokens each), "
             f"training jobs running throughout | {load['requests']:,} requests, **{load['failures']} failed** "
             f"(codes {load['codes']}); latency p50 {load['p50_s']} s, p95 {load['p95_s']} s; p95 per minute "
             f"{load['p95_by_minute_s']} |",
             f"| load | server RSS | {mib(load['rss_before'])} before, {mib(load['rss_max'])} at most, "
             f"{mib(load['rss_after'])} after |",
             f"| bursts | 3 × {args.burst_clients} clients at once, --max-batch 8 --max-queued 16 | "
             f"{burst['requests']} requests: {burst['ok']} answered, {burst['429']} refused with 429 "
             f"({burst['retry_after_missing']} without Retry-After), other codes {burst['other'] or 'none'}; "
             f"RSS after {mib(burst['rss_after'])} |",
             f"| faults | {faults['cycles']} SIGKILL cycles ({kinds}), 1–12 s after the job's worker starts (a "
             f"200-step job, a checkpoint every 10 steps) | **{len(faults['problems'])} problems** found by the "
             f"store checks; "
             f"{faults['jobs_finished']} jobs finished through the kills (resumed from checkpoints, up to "
             f"{faults['most_resumes_from_checkpoint_in_one_job']} times in one job); "
             f"{faults['adapters_served_after']} of them served afterwards |", ""]
    if faults["problems"]:
        table += ["Problems:", ""] + [f"- {p}" for p in faults["problems"]] + [""]
    table.append(end)
    block = "\n".join(table)
    if begin in text and end in text:
        text = text.split(begin)[0] + block + text.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
