"""Start-up recovery: a job left `running` is `interrupted` exactly when its worker is gone — told by the
lock the worker holds for its life, not by whether its PID answers (a zombie or a reused PID does)."""

import os
import signal
import subprocess
import sys
import time

from loraforge.jobs import JobQueue
from loraforge.store import Store
from server import ServerProcess, wait_for_job
from test_server import fast_config

HOLD = "import sys, time; from loraforge.jobs import hold_lock; h = hold_lock(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def _running_job(queue: JobQueue, pid: int | None) -> str:
    job = queue.submit(adapter="x", spec={}, records=[{"messages": [{"role": "user", "content": "a"},
                                                                    {"role": "assistant", "content": "b"}]}],
                       device="cpu")
    with queue.store.transaction() as db:
        db.execute("UPDATE jobs SET status = 'running', pid = ? WHERE id = ?", (pid, job.id))
    return job.id


def test_recovery_follows_the_workers_lock_not_its_pid(store_home):
    queue = JobQueue(Store())
    alive_id = _running_job(queue, pid=os.getpid())  # a PID that answers, like a reused one
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(queue.lock_file(alive_id))], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    zombie_id = _running_job(queue, pid=os.getpid())
    zombie = subprocess.Popen([sys.executable, "-c", HOLD, str(queue.lock_file(zombie_id))], stdout=subprocess.PIPE)
    assert zombie.stdout.readline().strip() == b"held"
    os.kill(zombie.pid, signal.SIGKILL)
    time.sleep(0.5)  # not waited for: a zombie whose PID still answers os.kill(pid, 0)
    os.kill(zombie.pid, 0)
    legacy_id = _running_job(queue, pid=None)  # no lock file, no PID
    try:
        assert sorted(queue.recover()) == sorted([zombie_id, legacy_id])
        assert queue.get(alive_id).status == "running"
        assert queue.get(zombie_id).status == queue.get(legacy_id).status == "interrupted"
    finally:
        holder.kill()
        holder.wait()
        zombie.wait()
    assert queue.recover() == [alive_id]


def test_a_killed_server_and_worker_leave_a_resumable_job(store_home, tiny_dir):
    srv = ServerProcess(store_home, "--max-jobs", "1")
    with srv.client() as c:
        job_id = c.post("/api/training/start", json=fast_config("crash", max_steps=300, batch_size=1,
                                                                 save_steps=20)).json()["job_id"]
        deadline = time.time() + 300
        while not list((store_home / "runs" / job_id).glob("checkpoint-*")) and time.time() < deadline:
            time.sleep(0.1)
    worker = JobQueue(Store()).get(job_id).pid
    os.kill(srv.proc.pid, signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)
    srv.proc.wait()
    srv.log.close()
    srv = ServerProcess(store_home, "--max-jobs", "1")  # the restart
    try:
        with srv.client() as c:
            assert c.get(f"/api/training/jobs/{job_id}").json()["status"] == "interrupted"
            assert c.post(f"/api/training/jobs/{job_id}/resume").status_code == 200
            job = wait_for_job(c, job_id)
            assert job["status"] == "succeeded", job
            assert "resumed from checkpoint-" in c.get(f"/api/training/jobs/{job_id}/events").text
    finally:
        srv.stop()
