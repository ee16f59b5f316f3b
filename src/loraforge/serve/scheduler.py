"""Starts queued jobs in worker processes and watches them (a thread inside the server)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from loraforge import paths
from loraforge.jobs import JobQueue

log = logging.getLogger("loraforge.scheduler")


class Scheduler:
    def __init__(self, queue: JobQueue, device: str, max_running: int = 1, poll_s: float = 0.3, nightly=None):
        self.queue = queue
        self.nightly = nightly  # loraforge.nightly.Nightly: queues inbox updates when due
        self._nightly_checked = 0.0
        self.device = device
        self.max_running = max_running
        self.poll_s = poll_s
        self.workers: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraforge-scheduler", daemon=True)

    def start(self) -> None:
        recovered = self.queue.recover()
        if recovered:
            log.warning("jobs interrupted by a previous stop: %s", ", ".join(recovered))
        for leftover in (self.queue.store.root / "tmp").glob("*"):
            paths.remove_tree(leftover)  # folders of runs that never published
        swept = self.queue.store.sweep()
        if swept:
            log.warning("removed version folders no record names (a crash mid-publish): %s", ", ".join(swept))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for job_id, proc in list(self.workers.items()):
            proc.terminate()
        for job_id, proc in list(self.workers.items()):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            self.queue.mark_interrupted(job_id, "the server stopped while the job was running")

    def _spawn(self, job_id: str) -> None:
        env = {**os.environ, "LORAFORGE_HOME": str(self.queue.store.root), "PYTHONUNBUFFERED": "1"}
        log_file = open(self.queue.store.root / "jobs" / f"{job_id}.out", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "loraforge.worker", job_id], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log_file.close()
        self.workers[job_id] = proc
        self.queue.set_pid(job_id, proc.pid)

    def tick(self) -> None:
        for job_id, proc in list(self.workers.items()):
            code = proc.poll()
            status = self.queue.get(job_id).status
            if code is None:
                if status == "cancelled":
                    proc.terminate()
                continue
            del self.workers[job_id]
            if status == "running":  # the worker died without recording an outcome (killed, OOM)
                self.queue.mark_interrupted(job_id, f"the worker process ended unexpectedly (exit code {code})")
            if status == "cancelled":
                paths.remove_tree(self.queue.store.run_dir(job_id))
        while True:
            job = self.queue.claim(self.device, self.max_running)
            if job is None:
                break
            self._spawn(job.id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                if self.nightly is not None and time.monotonic() - self._nightly_checked >= 20:
                    self._nightly_checked = time.monotonic()
                    for job_id in self.nightly.tick():
                        log.warning("nightly update queued as job %s", job_id)
            except Exception:  # keep scheduling; the error is logged for the operator
                log.exception("scheduler tick failed")
            time.sleep(self.poll_s)
