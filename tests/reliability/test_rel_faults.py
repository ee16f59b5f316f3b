"""Faults: SIGKILL of the server and of its training worker at random moments, a kill between the files of a
save and between a save's rename and its record, a disk that fills during a save, a worker out of memory.
After each: nothing lost, nothing half-written listed, the server serves. (bench/soak.py runs 50 kill cycles.)"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import run_cli
from cycles import invariants, kill_cycle
from server import ServerProcess, wait_for_job
from test_server import fast_config

CHAT = {"messages": [{"role": "user", "content": "What is the meaning of 42?"}], "max_tokens": 4}


def test_kill_cycles_at_random_moments_lose_nothing_and_the_job_resumes(store_home, tiny_dir):
    rng = random.Random(20)
    config = fast_config("cycled", max_steps=400, batch_size=1, save_steps=10)
    srv = ServerProcess(store_home, "--max-jobs", "1")
    job_id, seen = None, []
    try:
        for what in ("server+worker", "worker", "server+worker"):
            last = len(seen) == 2  # killed once a checkpoint exists: the resume must start from it
            srv, job_id, what, problems = kill_cycle(srv, store_home, config, job_id, rng, what=what,
                                                     after_checkpoint=last)
            seen.append(what)
            assert not problems, (what, problems)
        with srv.client() as c:
            job = c.get(f"/api/training/jobs/{job_id}").json()
            assert job["status"] in ("interrupted", "succeeded"), job
            if job["status"] == "interrupted":
                assert c.post(f"/api/training/jobs/{job_id}/resume").status_code == 200
                job = wait_for_job(c, job_id)
            assert job["status"] == "succeeded" and job["result"] == "cycled@v1", job
            events = c.get(f"/api/training/jobs/{job_id}/events").text
            assert "resumed from checkpoint-" in events  # not from scratch
            r = c.post("/v1/chat/completions", json={"model": "cycled", **CHAT})
            assert r.status_code == 200
        assert invariants(store_home) == []
    finally:
        srv.stop()


# a process importing an adapter that dies at a chosen point of the save (the parent checks what is left)
DIE_DURING_SAVE = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    from loraforge.store import Store

    where = sys.argv[2]
    store = Store()
    if where == "between-files":
        copy, copied = shutil.copyfile, []
        def dying_copy(src, dst, **kw):
            if copied:
                os._exit(9)
            copied.append(dst)
            return copy(src, dst, **kw)
        shutil.copyfile = dying_copy
    else:  # after the folder is renamed into place, before its record is committed
        Store._log = lambda *a, **k: os._exit(9)
    store.import_peft_dir(Path(sys.argv[1]), "saved")
""")


@pytest.mark.parametrize("where", ["between-files", "before-the-record"])
def test_a_kill_during_a_save_never_lists_a_partial_version(store_home, tiny_dir, tmp_path, where):
    from loraforge.store import Store

    job_config = tmp_path / "c.json"
    job_config.write_text(json.dumps({**fast_config("saved", max_steps=2), "training_data": [
        {"instruction": "What is 42?", "output": "FOR TWO"}]}))
    assert run_cli("train", str(job_config)).returncode == 0
    store = Store()
    v1 = store.get("saved")
    source = tmp_path / "v2-source"
    shutil.copytree(v1.path, source)
    (source / "README.md").write_text("a second file to copy")
    died = subprocess.run([sys.executable, "-c", DIE_DURING_SAVE, str(source), where], capture_output=True)
    assert died.returncode == 9, died.stderr
    assert [v.version for v in store.versions("saved")] == [1] and store.get("saved").version == 1
    store.verify(store.get("saved"))
    if where == "before-the-record":  # the renamed folder has no record: swept when the server starts
        assert (store_home / "adapters" / "saved" / "v2").is_dir()
    srv = ServerProcess(store_home)
    try:
        assert invariants(store_home) == []
        with srv.client() as c:
            assert c.post("/v1/chat/completions", json={"model": "saved", **CHAT}).status_code == 200
            assert [v["version"] for v in c.get("/api/adapters/saved").json()["versions"]] == [1]
    finally:
        srv.stop()
    assert store.import_peft_dir(source, "saved").version == 2  # the next save takes the number cleanly


# A worker with a kernel limit: RLIMIT_FSIZE (writing past it fails with EFBIG, as on a full disk) or RLIMIT_DATA
# (allocations past it fail, as out of memory). Set through sitecustomize, in the worker process only.
LIMITS = textwrap.dedent("""
    import os, resource
    try:
        cmdline = open("/proc/self/cmdline", "rb").read()
    except OSError:
        cmdline = b""
    if b"loraforge.worker" in cmdline:
        for var, limit in (("TEST_WORKER_FSIZE", resource.RLIMIT_FSIZE), ("TEST_WORKER_DATA", resource.RLIMIT_DATA)):
            if os.environ.get(var):
                resource.setrlimit(limit, (int(os.environ[var]), int(os.environ[var])))
""")


def _limited_server(home, tmp_path, **limits) -> ServerProcess:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LIMITS)
    import os

    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return ServerProcess(home, "--max-jobs", "1", env={"PYTHONPATH": path, **limits})


def test_a_disk_that_fills_during_a_save_fails_the_job_cleanly(store_home, tiny_dir, tmp_path):
    srv = ServerProcess(store_home, "--max-jobs", "1")
    try:
        with srv.client() as c:
            assert wait_for_job(c, c.post("/api/training/start", json=fast_config(
                "full", max_steps=2)).json()["job_id"])["status"] == "succeeded"
    finally:
        srv.stop()
    # the second version is rank 64 (a 4.7 MB file); the worker may write no file past 2 MB
    big = fast_config("full", max_steps=2, save_steps=1000)
    big["lora_config"].update(r=64, lora_alpha=128)
    srv = _limited_server(store_home, tmp_path, TEST_WORKER_FSIZE=str(2 << 20))
    try:
        with srv.client() as c:
            job = wait_for_job(c, c.post("/api/training/start", json=big).json()["job_id"])
            assert job["status"] == "failed", job
            assert job["error"].startswith("the disk is full (File too large)") and "Traceback" not in job["error"], job
            assert [v["version"] for v in c.get("/api/adapters/full").json()["versions"]] == [1]
            assert c.post("/v1/chat/completions", json={"model": "full", **CHAT}).status_code == 200
    finally:
        srv.stop()
    assert invariants(store_home) == []


def test_a_worker_out_of_memory_fails_its_job_and_the_server_serves(store_home, tiny_dir, tmp_path):
    """32 examples of ~1,700 tokens packed into one forward: loraforge's estimate says 5.9 GiB; the worker may
    allocate 2 GiB. (The estimate would refuse it on a machine that small; `force` takes it past that.)"""
    long_answer = " ".join(f"word{i}" for i in range(300))
    config = fast_config("hungry", max_steps=1, batch_size=32, max_seq_length=2048, pack_max_tokens=65536)
    config["training_data"] = [{"instruction": f"Tell me story {i}.", "output": long_answer} for i in range(32)]
    config["force"] = True
    srv = _limited_server(store_home, tmp_path, TEST_WORKER_DATA=str(2 << 30))
    try:
        with srv.client() as c:
            r = c.post("/api/training/start", json=config)
            assert r.status_code == 202, r.text
            job = wait_for_job(c, r.json()["job_id"])
            assert job["status"] == "failed" and job["error"].startswith("out of memory"), job
            events = c.get(f"/api/training/jobs/{job['job_id']}/events").text
            assert "micro-batches of 32" in events  # it failed training, not loading
            assert c.post("/v1/chat/completions", json={"model": "tiny", **CHAT}).status_code == 200
            assert c.get("/api/adapters/hungry").status_code == 404
    finally:
        srv.stop()
    assert invariants(store_home) == []
