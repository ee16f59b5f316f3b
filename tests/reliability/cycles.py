"""Kill/restart cycles and the store's invariants after each, shared by tests/reliability and bench/soak.py.

A cycle: a server is up with a job training (new, or the one interrupted last cycle, resumed); at a random
moment SIGKILL either the whole server and its worker, or the worker alone; then (after a restart where the
server died) check what a user would: no job still says `running`, SQLite's integrity check is ok, every
version's files match their sha256, no version folder lacks its record (or the other way round), nothing is
left in tmp/.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

from server import ServerProcess

SETTLE_S = 20  # how long a restarted server may take to mark a dead worker's job


def invariants(home: Path, *, after_restart: bool = True) -> list[str]:
    """What is wrong with the store at `home` (empty when nothing). tmp/ is checked after a restart only: a
    worker killed mid-save leaves its staging folder there until the server next starts and clears it."""
    from loraforge.store import Store, sha256_files

    problems = []
    db = sqlite3.connect(home / "store.db")
    try:
        if (check := db.execute("PRAGMA integrity_check").fetchone()[0]) != "ok":
            problems.append(f"integrity_check: {check}")
        running = [r[0] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'")]
        rows = db.execute("SELECT name, version FROM versions").fetchall()
    finally:
        db.close()
    if running:
        problems.append(f"jobs still running: {running}")
    store = Store(home)
    recorded = set()
    for name, number in rows:
        recorded.add((name, number))
        version = next(v for v in store.versions(name) if v.version == number)
        if not version.path.is_dir():
            problems.append(f"{name}@v{number}: folder missing")
        elif sha256_files(version.path) != version.files:
            problems.append(f"{name}@v{number}: files differ from their sha256")
    adapters = home / "adapters"
    for folder in adapters.glob("*/v*") if adapters.is_dir() else []:
        if (folder.parent.name, int(folder.name[1:])) not in recorded:
            problems.append(f"orphan folder {folder.relative_to(home)}")
    leftovers = list((home / "tmp").glob("*")) if after_restart and (home / "tmp").is_dir() else []
    if leftovers:
        problems.append(f"tmp/ not empty: {[p.name for p in leftovers]}")
    return problems


def job_running(client, config: dict, job_id: str | None, timeout: float = 120) -> str:
    """Resume `job_id` (interrupted) or submit `config`; return the job's id once its worker trains."""
    if job_id is not None and client.get(f"/api/training/jobs/{job_id}").json()["status"] == "interrupted":
        assert client.post(f"/api/training/jobs/{job_id}/resume").status_code == 200
    else:
        r = client.post("/api/training/start", json=config)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get(f"/api/training/jobs/{job_id}").json()["status"] in ("running", "succeeded", "failed"):
            return job_id
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not start")


def worker_pid(home: Path, job_id: str) -> int | None:
    db = sqlite3.connect(home / "store.db")
    try:
        row = db.execute("SELECT pid, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    return row[0] if row and row[1] == "running" else None


def _kill(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_cycle(srv: ServerProcess, home: Path, config: dict, job_id: str | None, rng: random.Random,
               *, what: str | None = None, after_checkpoint: bool = False,
               delay: tuple[float, float] = (0.2, 4.0)) -> tuple[ServerProcess, str, str, list[str]]:
    """One cycle; (the server now up, the job's id, what was killed, the problems found). With
    `after_checkpoint`, the kill waits until the run has written a new checkpoint; then `delay` seconds more
    (uniform between the two)."""
    before = set((home / "runs" / job_id).glob("checkpoint-*")) if job_id else set()
    with srv.client() as c:
        job_id = job_running(c, config, job_id)
    deadline = time.time() + 120
    while after_checkpoint and time.time() < deadline and not (
            set((home / "runs" / job_id).glob("checkpoint-*")) - before):
        time.sleep(0.1)
    time.sleep(rng.uniform(*delay))
    what = what or rng.choice(["server+worker", "worker"])
    pid = worker_pid(home, job_id)
    if what == "server+worker":
        _kill(srv.proc.pid)
        _kill(pid)
        srv.proc.wait()
        srv.log.close()
        srv = ServerProcess(home, "--max-jobs", "1")  # the restart
    else:
        _kill(pid)
    with srv.client() as c:  # the job leaves `running` (interrupted, or finished if it won the race)
        deadline = time.time() + SETTLE_S
        while c.get(f"/api/training/jobs/{job_id}").json()["status"] == "running" and time.time() < deadline:
            time.sleep(0.2)
    return srv, job_id, what, invariants(home, after_restart=what == "server+worker")
