"""Start the real server process on a free port for integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, home: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(home / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraforge", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            env={**os.environ, "LORAFORGE_HOME": str(home), **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        raise RuntimeError("server did not start: " + (home / "server.log").read_text()[-2000:])

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=300, **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def wait_for_job(client: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled", "interrupted"),
                 timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/training/jobs/{job_id}").json()
        if job["status"] in states:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job['status']}")
