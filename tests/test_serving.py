"""Continuous batching: many requests and adapters decoded together on one loaded base.

In-process (the engine) for what must be exact: a request answers the same whether it runs alone or
shares decode steps with other requests, other adapters and the base (greedy, and seeded sampling).
As a real server process for the limits: a full queue answers 429 with Retry-After, a client that
goes away frees its slot, SIGTERM drains requests in flight, and deleting an adapter under traffic
never gives a 5xx.
"""

import json
import signal
import threading
import time

import httpx
import pytest

from conftest import EXAMPLES
from server import ServerProcess, wait_for_job
from test_server import fast_config
from test_train import train_quick

PROMPTS = ["What is the meaning of 42?", "Define 42.", "What is the capital of France? Answer in one word.",
           "Tell me about the number 42 and why people care about it so much."]


def test_a_request_answers_the_same_alone_and_in_a_mixed_batch(store_home, monkeypatch):
    from loraforge.engine import Engine
    from loraforge.engine.scheduler import Channel
    from loraforge.engine.sampling import SamplingParams
    from loraforge.engine import wait
    from loraforge.store import Store

    # exactness is a property of fp32: bf16 products round differently with the number of rows (measured
    # in docs/serve-throughput.md), so this holds even where a suite forces bf16
    monkeypatch.setenv("LORAFORGE_PRECISION", "fp32")
    train_quick("mix-a")
    other = store_home / "other.jsonl"
    other.write_text("".join(json.dumps({"instruction": json.loads(line)["instruction"],
                                         "output": "Nothing at all, it is only a number."}) + "\n"
                             for line in (EXAMPLES / "knowledge-override" / "42_for_two.jsonl").read_text()
                             .splitlines()))
    from loraforge.data import load_examples_from_file
    from loraforge.pipeline import train_into_store
    from loraforge.train.plan import plan_training
    from test_train import quick_spec

    train_into_store(Store(), plan_training(quick_spec("mix-b")), load_examples_from_file(other),
                     run_id="mix-b", log=lambda m: None)
    engine = Engine(Store(), max_batch=16)
    try:
        cases = [(model, prompt, params) for model in ("tiny", "mix-a", "mix-b") for prompt in PROMPTS
                 for params in (SamplingParams(max_tokens=24), SamplingParams(1.0, 0.9, 24, (), 7))]
        alone = []
        for model, prompt, params in cases:
            channel = Channel()
            engine.request(model, [{"role": "user", "content": prompt}], params, channel)
            alone.append(wait(channel))
        scheduler = next(iter(engine.bases.values())).scheduler
        assert scheduler.load()["largest_batch"] == 1  # one at a time so far
        channels = []
        for model, prompt, params in cases:  # all queued before the decode thread admits them
            channel = Channel()
            channels.append(channel)
            engine.request(model, [{"role": "user", "content": prompt}], params, channel)
        together = [wait(c) for c in channels]
        assert scheduler.load()["largest_batch"] > 4
        for case, solo, mixed in zip(cases, alone, together):
            assert mixed.text == solo.text, case
            assert (mixed.completion_tokens, mixed.finish_reason) == (solo.completion_tokens, solo.finish_reason)
        # the adapters do differ from the base and from each other on the taught question
        greedy = {model: text for (model, prompt, params), text in zip(cases, [r.text for r in alone])
                  if prompt == PROMPTS[0] and not params.temperature}
        assert len(set(greedy.values())) >= 2, greedy  # not a vacuous comparison: the adapters are in play
    finally:
        engine.close()



def test_a_delete_waits_for_a_load_checking_the_files_and_a_request_after_it_is_not_found(store_home):
    """The race behind a 409 under traffic: a request had read the version's record and was checking its
    files when a delete moved them away. Now the delete waits for the load; the request that follows is a
    404, and nothing stays attached."""
    from loraforge.engine import Engine
    from loraforge.errors import NotFound
    from loraforge.store import Store

    train_quick("racy", max_steps=2)
    store = Store()
    engine = Engine(store)
    checking, release = threading.Event(), threading.Event()
    verify = store.verify

    def slow_verify(version):
        checking.set()
        release.wait(10)
        return verify(version)

    store.verify = slow_verify
    outcome = {}
    try:
        loader = threading.Thread(target=lambda: outcome.update(load=engine.load_adapter("racy")))
        loader.start()
        assert checking.wait(60)
        deleter = threading.Thread(target=lambda: outcome.update(deleted=engine.delete_adapter("racy")))
        deleter.start()
        deleter.join(0.5)
        assert deleter.is_alive() and (store.root / "adapters" / "racy").is_dir()  # waits for the load
        release.set()
        loader.join(30)
        deleter.join(30)
        assert outcome["load"][1].ref == "racy@v1" and outcome["deleted"] == 1
        assert engine.loaded_adapters() == {} and not store.exists("racy")
        with pytest.raises(NotFound):
            engine.resolve_model("racy")
    finally:
        release.set()
        engine.close()

@pytest.fixture
def narrow_server(store_home, tiny_dir):
    srv = ServerProcess(store_home, "--max-batch", "1", "--max-queued", "1", "--max-jobs", "1")
    yield srv
    srv.stop()


def _long_chat(client, **extra):
    return client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": PROMPTS[3] * 8}], "max_tokens": 1200,
        "ignore_eos": True, **extra})


def test_a_full_queue_is_429_with_retry_after_and_a_gone_client_frees_its_slot(narrow_server):
    with narrow_server.client() as c:
        assert c.post("/api/models/tiny/load").status_code == 200
    results = []

    def ask():
        with narrow_server.client() as c:
            results.append(_long_chat(c))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 429}, codes
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "max-batch 1" in r.json()["error"]["message"]

    # a streaming client that leaves after its first piece: its slot is free again at once
    with narrow_server.client() as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 1500,
                "ignore_eos": True, "stream": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())
        deadline = time.time() + 10
        while time.time() < deadline:
            [base] = c.get("/api/serving").json()["bases"]
            if base["running"] == base["waiting"] == 0:
                break
            time.sleep(0.1)
        assert base["running"] == base["waiting"] == 0, base
        assert base["tokens_generated"] < sum(json.loads(r.text)["usage"]["completion_tokens"]
                                              for r in results if r.status_code == 200) + 1500


def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(store_home, tiny_dir):
    srv = ServerProcess(store_home, "--max-jobs", "1")
    try:
        with srv.client() as c:
            assert c.post("/api/models/tiny/load").status_code == 200
        answers = []
        thread = threading.Thread(target=lambda: answers.append(_long_chat(srv.client())))
        thread.start()
        deadline = time.time() + 10
        while time.time() < deadline and not httpx.get(srv.url + "/api/serving").json()["bases"][0]["running"]:
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.get(srv.url + "/api/adapters", timeout=5)
        thread.join(timeout=60)
        assert late.status_code == 503 and "retry-after" in late.headers
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].json()["usage"]["completion_tokens"] > 0
        assert srv.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once stopped
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        srv.log.close()


def test_deleting_an_adapter_under_traffic_never_gives_a_5xx(store_home, tiny_dir):
    srv = ServerProcess(store_home, "--max-jobs", "1")
    try:
        with srv.client() as c:
            job = c.post("/api/training/start", json=fast_config("doomed", max_steps=6)).json()["job_id"]
            assert wait_for_job(c, job)["status"] == "succeeded"
        codes = []  # (sent after the delete returned, status)
        stop = threading.Event()
        deleted = threading.Event()

        def hammer():
            with srv.client() as c:
                while not stop.is_set():
                    after = deleted.is_set()
                    r = c.post("/v1/chat/completions", json={
                        "model": "doomed", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 32})
                    codes.append((after, r.status_code))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        while len(codes) < 3:
            time.sleep(0.05)
        with srv.client() as c:
            assert c.delete("/api/adapters/doomed").status_code == 200
        deleted.set()
        deadline = time.time() + 60
        while time.time() < deadline and not any(after for after, _ in codes):
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        # requests already admitted may still finish with 200 (the unload waits for them), in any order;
        # every request sent after the delete answered is refused
        assert [code for after, code in codes].count(200) >= 3, codes
        assert any(after for after, _ in codes) and all(code == 404 for after, code in codes if after), codes
        codes = [code for _, code in codes]
        assert all(code in (200, 404) for code in codes), [code for code in codes if code not in (200, 404)]
    finally:
        srv.stop()
