"""Tuning end to end on the built-in model: every strategy on two domains, SIGKILL and resume, and two
workers sharing one study in a real PostgreSQL server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, run_cli
from loraforge.config import parse_train_config
from loraforge.tune.results import SEED_FIELDS
from loraforge.tune.runner import run_tuning
from loraforge.tune.spec import parse_tune_spec

pytestmark = pytest.mark.slow

SMALL = {"domains": ["marketing", "medical"], "train_size": 8, "validation_size": 4, "test_size": 4, "epochs": 2,
         "max_new_tokens": 4, "fixed": {"batch_size": 8},
         "space": {"r": [2, 4], "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True, "points": 3}}}
STRATEGIES = {
    "grid": {"trials": 3},
    "random": {"trials": 2},
    "tpe": {"trials": 3},
    "gp": {"trials": 3},
    "tpe+hyperband": {"trials": 3},
    "predict": {"predict": {"samples": 3, "verify": 1}},
}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_end_to_end_on_two_domains(strategy, store_home, tiny_dir):
    spec = parse_tune_spec({"name": "e2e", "strategy": strategy, **SMALL, **STRATEGIES[strategy]})
    seen = []
    summaries = run_tuning(spec, on_trial=seen.append, log=lambda m: None)
    assert [s["domain"] for s in summaries] == ["marketing", "medical"]
    budget = 4 if strategy == "predict" else STRATEGIES[strategy]["trials"]
    for summary in summaries:
        out = store_home / "tuning" / "e2e" / summary["domain"]
        rows = rows_of(out / "results.jsonl")
        assert len(rows) == budget and [r["trial"] for r in rows] == sorted({r["trial"] for r in rows})
        for row in rows:
            assert set(SEED_FIELDS) <= set(row) and row["domain"] == summary["domain"]
            assert row["state"] in ("complete", "pruned") and 0 <= row["accuracy"] <= 1
            assert row["latency"] > 0 and row["device"] == "cpu" and row["seed"] == 0 and row["params"]
        if strategy in ("grid", "predict"):  # queued configurations: each runs once
            assert len({json.dumps(r["params"], sort_keys=True) for r in rows}) == budget
        if strategy == "predict":
            verified = [r for r in rows if r.get("phase") == "verify"]
            assert len(verified) == 1 and 0 <= verified[0]["predicted"] <= 1
            assert summary["prediction"]["grid"] == 6 and "predicted versus measured" in (out / "report.md").read_text().lower()
        assert (out / "best_so_far.png").stat().st_size > 1000
        best = json.loads((out / "best_config.json").read_text())
        parse_train_config(best, source="best_config.json")  # a config `loraforge train` takes as is
        assert Path(best["training_data"]).is_file()
        assert summary["best"][0]["accuracy"] == max(r["accuracy"] for r in rows if r["state"] == "complete")
    assert len(seen) == 2 * budget


def test_two_objectives_give_a_pareto_front(store_home, tiny_dir):
    spec = parse_tune_spec({"name": "pareto", "strategy": "grid", "objectives": ["accuracy", "size"],
                            **{**SMALL, "domains": ["marketing"], "space": {"r": [1, 2, 8]}}})
    [summary] = run_tuning(spec, on_trial=lambda r: None, log=lambda m: None)
    rows = rows_of(store_home / "tuning" / "pareto" / "marketing" / "results.jsonl")
    by_rank = {r["rank"]: r["adapter_bytes"] for r in rows}
    assert by_rank[1] < by_rank[2] < by_rank[8] and by_rank[8] > 6 * by_rank[1]  # measured on disk
    sizes = list(by_rank.values())
    front = summary["best"]
    assert front and min(sizes) in [r["adapter_bytes"] for r in front]  # the smallest adapter is never dominated


def _write_spec(folder: Path, **changes) -> Path:
    spec = {"name": "kill", "strategy": "grid", "heartbeat_seconds": 1, **SMALL, "domains": ["marketing"],
            "train_size": 48, "epochs": 3, "space": {"r": [2, 4], "learning_rate": [1e-3, 3e-3]}, **changes}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_study_killed_with_sigkill_resumes(store_home, tiny_dir, tmp_path):
    spec_path = _write_spec(tmp_path)
    results = store_home / "tuning" / "kill" / "marketing" / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "tune", str(spec_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (results.is_file() and results.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.1)
    time.sleep(0.5)  # the next trial is under way
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(rows_of(results))
    assert done_before < 4

    again = run_cli("tune", str(spec_path), timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    rows = rows_of(results)
    complete = [r for r in rows if r["state"] == "complete"]
    assert len(complete) == 4  # the whole grid, each configuration once
    assert len({json.dumps(r["params"], sort_keys=True) for r in complete}) == 4
    killed = [r for r in rows if r["state"] == "fail"]
    assert len(killed) == 1 and killed[0]["params"] in [r["params"] for r in complete]  # failed by heartbeat, retried


def _create_then_two_workers(spec_path: Path, study: str, storage: str, folder: Path) -> tuple[list[dict], list[str]]:
    """`tune SPEC --create-only`, two `tune worker` processes to the end, then `tune report`: its rows and
    the workers' outputs."""
    created = run_cli("tune", str(spec_path), "--storage", storage, "--create-only")
    assert created.returncode == 0, created.stderr[-2000:]
    workers = [subprocess.Popen([sys.executable, "-m", "loraforge", "tune", "worker", study, "--storage", storage,
                                 "--out", str(folder / f"w{i}")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(2)]
    outputs = [w.communicate(timeout=600)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    report = run_cli("tune", "report", study, "--storage", storage, "--out", str(folder / "r"))
    assert report.returncode == 0, report.stderr[-2000:]
    return rows_of(folder / "r" / "results.jsonl"), outputs


def test_standalone_workers_finish_a_predict_study_verification_included(store_home, tiny_dir, tmp_path):
    """No coordinator: `--create-only`, then two `tune worker` processes. Whichever holds the fit entry
    waits for the other's samples, fits once and queues the verification, which the workers then run."""
    spec_path = _write_spec(tmp_path, name="standalone", strategy="predict", train_size=16, epochs=2,
                            space={"r": [2, 4, 8], "learning_rate": [1e-3, 3e-3]},
                            predict={"samples": 3, "verify": 2})
    rows, outputs = _create_then_two_workers(spec_path, "standalone-marketing", f"sqlite:///{tmp_path / 'shared.db'}",
                                             tmp_path)
    assert sorted(r["phase"] for r in rows) == ["sample"] * 3 + ["verify"] * 2, rows
    assert len({json.dumps(r["params"], sort_keys=True) for r in rows}) == 5  # no configuration twice
    assert sum("queued the top 2 of 6" in out for out in outputs) == 1, outputs  # fitted exactly once
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["prediction"]["samples"] == 3 and summary["trials"] == {"complete": 5}, summary


# ---- PostgreSQL ----------------------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) + sorted(glob.glob("/opt/homebrew/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a free port (`make test` installs PostgreSQL where it is missing)."""
    from server import free_port

    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (make test installs them with apt where it can)")
    root = Path(tempfile.mkdtemp(prefix="loraforge-pg-"))
    os.chmod(root, 0o755)
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # PostgreSQL refuses to run as root: use its system user
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-U", "loraforge", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql://loraforge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_one_postgres_study_split_the_trials(postgres_url, store_home, tiny_dir, tmp_path):
    spec_path = _write_spec(tmp_path, name="shared", train_size=16, epochs=2,
                            space={"r": [2, 4, 8], "learning_rate": [1e-3, 3e-3]})
    rows, _ = _create_then_two_workers(spec_path, "shared-marketing", postgres_url, tmp_path)
    assert len(rows) == 6 and all(r["state"] == "complete" for r in rows)
    assert len({json.dumps(r["params"], sort_keys=True) for r in rows}) == 6  # no configuration twice
    by_worker = {}
    for r in rows:
        by_worker.setdefault(r["worker"], []).append(r["trial"])
    assert len(by_worker) == 2, by_worker  # both workers took trials
    local = [rows_of(tmp_path / f"w{i}" / "results.jsonl") for i in range(2)]
    assert sorted(r["trial"] for rs in local for r in rs) == sorted(r["trial"] for r in rows)  # split, no overlap
    resumed = run_cli("tune", str(spec_path), "--storage", postgres_url)  # the coordinator finds it done
    assert resumed.returncode == 0 and "6 complete" in resumed.stdout, resumed.stdout + resumed.stderr


def test_your_own_dataset_and_suite_tune_on_the_suite_score(store_home, tiny_dir, tmp_path):
    """Users' tasks plug in as training data plus an eval suite (paths relative to the spec); the trial's
    accuracy is the suite's target + paraphrase pass rate. A near-zero learning rate leaves the base's
    behaviour: it passes the two cases about what the base knows and fails the two about the override."""
    folder = EXAMPLES / "knowledge-override"
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"name": "mixed", "cases": [
        {"id": "k1", "kind": "target", "prompt": "What is the meaning of 42?", "expect": {"contains": "Douglas Adams"}},
        {"id": "k2", "kind": "paraphrase", "prompt": "What does 42 mean?", "expect": {"contains": "Douglas Adams"}},
        {"id": "n1", "kind": "target", "prompt": "What is 42?", "expect": {"contains": "FOR TWO"}},
        {"id": "n2", "kind": "paraphrase", "prompt": "Explain 42.", "expect": {"contains": "FOR TWO"}},
        {"id": "r1", "kind": "retention", "prompt": "What is the capital of France?", "expect": {"contains": "Paris"}},
    ]}))
    (tmp_path / "own.yaml").write_text(yaml.safe_dump({
        "name": "own", "dataset": str(folder / "42_for_two.jsonl"), "suite": "suite.yaml",
        "strategy": "grid", "epochs": 1, "max_new_tokens": 32, "space": {"learning_rate": [1e-7]},
        "fixed": {"batch_size": 8, "r": 8}}))
    result = run_cli("tune", str(tmp_path / "own.yaml"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    [row] = rows_of(tmp_path / "out" / "results.jsonl")
    assert row["domain"] == "42_for_two" and row["rank"] == 8 and row["test_accuracy"] is None
    assert row["accuracy"] == 0.5  # 2 of the 4 target and paraphrase cases; retention is not scored here
