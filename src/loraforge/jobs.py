"""The training job queue, in the store's SQLite database.

States: queued → running → succeeded | failed | cancelled; a job whose worker died while `running`
becomes `interrupted` and can be resumed from its last checkpoint (it is queued again with
resume=1). How many jobs run at once on a device is enforced by the claim transaction (BEGIN
IMMEDIATE, so across processes), not by a lock in memory.

Progress and log lines are rows of `job_events` with increasing ids: the SSE stream replays from
`Last-Event-ID`, so a reconnecting page loses nothing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loraforge import paths
from loraforge.errors import Conflict, NotFound
from loraforge.store import Store

JOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL DEFAULT 'train',
    adapter TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled',
                                           'interrupted')),
    device TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    progress_json TEXT,
    result TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, device);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    type TEXT NOT NULL,
    data_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id, id);
"""
TERMINAL = ("succeeded", "failed", "cancelled")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    adapter: str
    status: str
    device: str
    spec: dict
    resume: bool
    pid: int | None
    progress: dict | None
    result: str | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    def public(self) -> dict[str, Any]:
        return {"job_id": self.id, "kind": self.kind, "adapter": self.adapter, "status": self.status,
                "device": self.device, "progress": self.progress, "result": self.result, "error": self.error,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at}


class JobQueue:
    def __init__(self, store: Store):
        self.store = store
        with store.reading() as db:
            db.executescript(JOB_SCHEMA)

    def _row(self, row) -> Job:
        return Job(row["id"], row["kind"], row["adapter"], row["status"], row["device"], json.loads(row["spec_json"]),
                   bool(row["resume"]), row["pid"], json.loads(row["progress_json"]) if row["progress_json"] else None,
                   row["result"], row["error"], row["created_at"], row["started_at"], row["finished_at"])

    def data_file(self, job_id: str) -> Path:
        return paths.inside(self.store.root / "jobs", f"{job_id}.jsonl")

    def submit(self, *, adapter: str, spec: dict, records: list, device: str, kind: str = "train") -> Job:
        """Queue a job; its data is written next to the queue before the row exists."""
        job_id = uuid.uuid4().hex
        paths.atomic_write_text(self.data_file(job_id),
                                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        with self.store.transaction() as db:
            db.execute("INSERT INTO jobs(id, kind, adapter, status, device, spec_json, created_at) "
                       "VALUES (?, ?, ?, 'queued', ?, ?, ?)", (job_id, kind, adapter, device, json.dumps(spec), _now()))
            self._event(db, job_id, "state", {"status": "queued"})
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self.store.reading() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        return self._row(row)

    def list(self, limit: int = 200) -> list[Job]:
        with self.store.reading() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        return [self._row(r) for r in rows]

    # ---- state transitions ------------------------------------------------------------------------------
    def claim(self, device: str, max_running: int) -> Job | None:
        """Atomically move the oldest queued job on `device` to running, if fewer than max_running run."""
        with self.store.transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running' AND device = ?",
                                 (device,)).fetchone()[0]
            if running >= max_running:
                return None
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' AND device = ? ORDER BY created_at, rowid "
                             "LIMIT 1", (device,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', started_at = ?, pid = NULL WHERE id = ?",
                       (_now(), row["id"]))
            self._event(db, row["id"], "state", {"status": "running"})
        return self.get(row["id"])

    def set_pid(self, job_id: str, pid: int) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (pid, job_id))

    def finish(self, job_id: str, status: str, *, result: str | None = None, error: str | None = None) -> bool:
        """Move a running job to a final state; False if it was no longer running (e.g. cancelled)."""
        with self.store.transaction() as db:
            changed = db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?, pid = NULL "
                                 "WHERE id = ? AND status = 'running'",
                                 (status, result, error, _now(), job_id)).rowcount
            if changed:
                self._event(db, job_id, "state", {"status": status, "result": result, "error": error})
        return bool(changed)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} is already {job.status}", field="job_id")
        with self.store.transaction() as db:
            db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? AND status IN "
                       "('queued', 'running', 'interrupted')", (_now(), job_id))
            self._event(db, job_id, "state", {"status": "cancelled"})
        return self.get(job_id)

    def resume(self, job_id: str) -> Job:
        with self.store.transaction() as db:
            changed = db.execute("UPDATE jobs SET status = 'queued', resume = 1, error = NULL, finished_at = NULL "
                                 "WHERE id = ? AND status IN ('interrupted', 'failed')", (job_id,)).rowcount
            if changed:
                self._event(db, job_id, "state", {"status": "queued", "resume": True})
        if not changed:
            job = self.get(job_id)
            raise Conflict(f"job {job_id} is {job.status}; only interrupted or failed jobs resume", field="job_id")
        return self.get(job_id)

    def mark_interrupted(self, job_id: str, reason: str) -> bool:
        with self.store.transaction() as db:
            changed = db.execute("UPDATE jobs SET status = 'interrupted', error = ?, pid = NULL WHERE id = ? "
                                 "AND status = 'running'", (reason, job_id)).rowcount
            if changed:
                self._event(db, job_id, "state", {"status": "interrupted", "error": reason})
        return bool(changed)

    def lock_file(self, job_id: str) -> Path:
        return paths.inside(self.store.root / "jobs", f"{job_id}.lock")

    def worker_alive(self, job_id: str, pid: int | None) -> bool:
        """Whether the job's worker still runs: it holds an exclusive lock on the job's lock file for its
        whole life, and the kernel drops that lock when the process ends (a dead, not-yet-reaped or
        PID-reusing process cannot hold it). Workers from before the lock file: by PID."""
        lock = self.lock_file(job_id)
        if lock.is_file():
            return not try_lock(lock)
        return pid is not None and pid_alive(pid)

    def recover(self) -> list[str]:
        """At start-up: every job left `running` whose worker is gone becomes `interrupted`."""
        with self.store.reading() as db:
            rows = db.execute("SELECT id, pid FROM jobs WHERE status = 'running'").fetchall()
        recovered = []
        for row in rows:
            if not self.worker_alive(row["id"], row["pid"]):
                if self.mark_interrupted(row["id"], "the worker stopped while the job was running"):
                    recovered.append(row["id"])
        return recovered

    # ---- progress events -----------------------------------------------------------------------------------
    @staticmethod
    def _event(db, job_id: str, type_: str, data: dict) -> None:
        db.execute("INSERT INTO job_events(job_id, type, data_json, created_at) VALUES (?, ?, ?, ?)",
                   (job_id, type_, json.dumps(data), time.time()))

    def add_event(self, job_id: str, type_: str, data: dict) -> None:
        with self.store.transaction() as db:
            self._event(db, job_id, type_, data)
            if type_ == "progress":
                db.execute("UPDATE jobs SET progress_json = ? WHERE id = ?", (json.dumps(data), job_id))

    def events_after(self, job_id: str, last_id: int) -> list[tuple[int, str, dict]]:
        with self.store.reading() as db:
            rows = db.execute("SELECT id, type, data_json FROM job_events WHERE job_id = ? AND id > ? ORDER BY id",
                              (job_id, last_id)).fetchall()
        return [(r["id"], r["type"], json.loads(r["data_json"])) for r in rows]


def try_lock(path: Path) -> bool:
    """Take and release the exclusive lock on `path` at once; False when another process holds it."""
    import fcntl

    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def hold_lock(path: Path):
    """Hold an exclusive lock on `path` until the returned file is closed or the process ends."""
    import fcntl

    handle = open(path, "a+b")  # noqa: SIM115 - kept open on purpose: the lock lives as long as the process
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
