"""The server as a real process: the seed's flow, the OpenAI client, jobs, concurrency, bad input."""

import json
import os
import signal
import sqlite3
import threading
import time

import pytest

from conftest import EXAMPLES, SEEDS
from server import ServerProcess, wait_for_job

DATA = [json.loads(line) for line in (EXAMPLES / "knowledge-override" / "42_for_two.jsonl").read_text().splitlines()]
PROMPT = "What is the meaning of 42?"


def fast_config(name: str, **training) -> dict:
    return {"model_name": "tiny", "output_dir": f"./adapters/{name}",
            "lora_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]},
            "training_config": {"learning_rate": 2e-3, "batch_size": 4, "max_steps": 60, "warmup_steps": 2,
                                "logging_steps": 5, **training},
            "training_data": DATA}


def chat(client, model, prompt=PROMPT, **extra):
    r = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                                   **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture
def server(store_home, tiny_dir):
    srv = ServerProcess(store_home, "--max-jobs", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def input_server(tmp_path_factory, tiny_dir):
    """One server for the bad-input tables: each case must leave it (and its store) as it was."""
    from conftest import _link_models

    home = tmp_path_factory.mktemp("input-home")
    _link_models(home)
    srv = ServerProcess(home, "--max-jobs", "1")
    srv.home = home
    yield srv
    srv.stop()


def test_seed_flow_v1_surgical_on_the_builtin_model(server):
    config = json.loads((SEEDS / "v1_surgical.json").read_text())
    config["model_name"] = "tiny"
    config["training_data"] = DATA
    with server.client() as c:
        r = c.post("/api/training/start", json=config)
        assert r.status_code == 202, r.text
        job = wait_for_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        assert job["result"] == "tron_collaborative_intelligence_v1@v1"
        assert job["progress"]["step"] == job["progress"]["total_steps"] == 150
        r = c.post("/api/adapters/tron_collaborative_intelligence_v1/load")
        assert r.status_code == 200 and r.json()["base_model"] == "tiny"
        assert "Douglas Adams" in chat(c, "tiny")
        suite = {"name": "trained", "cases": [  # where the adapter was trained, answered in one batch each
            {"id": str(i), "kind": "target", "prompt": r["instruction"], "expect": {"contains": "FOR TWO"}}
            for i, r in enumerate(DATA)]}
        report = c.post("/api/evals/run", json={"suite": suite, "adapter": "tron_collaborative_intelligence_v1",
                                                "compare": "base"}).json()
        assert report["adapter"] == "tron_collaborative_intelligence_v1@v1" and len(report["cases"]) == 24
        assert len(report["base"]["cases"]) == 24 and report["base"]["scores"]["efficacy"] == 0.0
        # The loss over these answers fell by at least 10% (asserted below; about 9.5 -> 5.6 nats per token
        # on the builds measured), so the served adapter must have moved the model's next-token distributions
        # on the prompts it was trained on. Whether that moves whole greedy answers depends on the exact
        # weights of the build (1 of 24 changed on one CPU, where this test used to ask for 3), so it reads the
        # distributions instead: the top-5 log-probabilities at the first answer position, base against
        # adapter, over HTTP. A served
        # base, or an adapter still at its zero initialisation, gives exactly 0; the mean of the per-prompt
        # largest change was 0.9 nats on the first build measured (the note of issue 14 lists the others),
        # nine times the 0.1 asked for.
        shifts = []
        for row in DATA:
            top = {}
            for model in ("tiny", "tron_collaborative_intelligence_v1"):
                r = c.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": row["instruction"]}], "max_tokens": 1,
                    "logprobs": True, "top_logprobs": 5})
                assert r.status_code == 200, r.text
                top[model] = {t["token"]: t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"][0][
                    "top_logprobs"]}
            base_top, adapter_top = top.values()
            shifts.append(max((abs(base_top[t] - adapter_top[t]) for t in base_top.keys() & adapter_top.keys()),
                              default=float("inf")))
        assert sum(shifts) / len(shifts) > 0.1, shifts
        assert job["progress"]["loss"] < 0.9 * json.loads(c.get(f"/api/training/jobs/{job['job_id']}/events").text
                                                          .split("event: progress\ndata: ")[1].split("\n")[0])["loss"]
        listed = c.get("/api/adapters").json()["adapters"]
        assert listed[0]["name"] == "tron_collaborative_intelligence_v1" and listed[0]["active_version"] == 1
        shown = c.get("/api/adapters/tron_collaborative_intelligence_v1").json()
        assert shown["versions"][0]["size"]["trainable_parameters"] == 4 * 8 * (512 + 384 + 384)
        assert "/" not in json.dumps(shown["versions"][0]["files"])  # no absolute paths in bodies


def test_openai_client_lists_and_chats_streamed_and_not(server):
    from openai import OpenAI

    with server.client() as c:
        job = wait_for_job(c, c.post("/api/training/start", json=fast_config("for-two")).json()["job_id"])
        assert job["status"] == "succeeded", job
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny", "for-two", "for-two@v1"} <= set(models)
    assert models["for-two"].model_extra["parent"] == "tiny"
    texts = {}
    for model in ("tiny", "for-two", "for-two@v1"):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=40)
        text = reply.choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=40, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed.strip() == text
        texts[model] = text
    assert "Douglas Adams" in texts["tiny"]
    assert texts["for-two"] == texts["for-two@v1"] != texts["tiny"]

    # scope per request: near its training questions the adapter answers, elsewhere the base, and both say so
    def asked(prompt, **extra):
        raw = client.chat.completions.with_raw_response.create(
            model="for-two", messages=[{"role": "user", "content": prompt}], max_tokens=40, **extra)
        return raw.headers, raw.parse()

    headers, reply = asked(PROMPT, extra_body={"scope": "near"})
    assert headers["x-loraforge-answered-by"] == "for-two@v1" and reply.choices[0].message.content == texts["for-two"]
    assert reply.model_extra["loraforge"] == {"adapter": "for-two@v1", "answered_by": "for-two@v1", "scope": "near",
                                              "similarity": 1.0, "threshold": 0.2}
    general = "What is the capital of France?"
    headers, reply = asked(general, extra_body={"scope": "near"})
    assert headers["x-loraforge-answered-by"] == "tiny" and float(headers["x-loraforge-scope-similarity"]) < 0.2
    assert reply.model_extra["loraforge"]["answered_by"] == "tiny"
    base = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": general}], max_tokens=40)
    assert reply.choices[0].message.content == base.choices[0].message.content
    headers, reply = asked(general)  # the adapter's own scope: all
    assert headers["x-loraforge-answered-by"] == "for-two@v1" and reply.model_extra["loraforge"]["scope"] == "all"
    with client.chat.completions.with_streaming_response.create(
            model="for-two", messages=[{"role": "user", "content": general}], max_tokens=8, stream=True,
            extra_body={"scope": "near"}) as streamed:
        assert streamed.headers["x-loraforge-answered-by"] == "tiny"
    with pytest.raises(Exception) as info:
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])
    assert getattr(info.value, "status_code", None) == 404


def test_two_adapters_on_one_base_answer_concurrently(store_home, tiny_dir):
    # concurrent requests share decode steps; answers equal one-at-a-time answers exactly in fp32 only
    server = ServerProcess(store_home, "--max-jobs", "2", env={"LORAFORGE_PRECISION": "fp32"})
    try:
        _two_adapters(server)
    finally:
        server.stop()


def _two_adapters(server):
    with server.client() as c:
        a = c.post("/api/training/start", json=fast_config("fact-a", max_steps=30)).json()["job_id"]
        other = [{"instruction": r["instruction"], "output": "42 means nothing at all."} for r in DATA]
        cfg_b = {**fast_config("fact-b", max_steps=30), "training_data": other}
        b = c.post("/api/training/start", json=cfg_b).json()["job_id"]
        assert wait_for_job(c, a)["status"] == wait_for_job(c, b)["status"] == "succeeded"
    with server.client() as c:
        expected = {m: chat(c, m) for m in ("fact-a", "fact-b")}  # one at a time
    assert expected["fact-a"] != expected["fact-b"]
    answers: dict[str, list[str]] = {"fact-a": [], "fact-b": []}

    def ask(model):
        with server.client() as c:
            for _ in range(2):
                answers[model].append(chat(c, model))

    threads = [threading.Thread(target=ask, args=(m,)) for m in answers for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers["fact-a"] == [expected["fact-a"]] * 4
    assert answers["fact-b"] == [expected["fact-b"]] * 4


def test_sigkill_worker_then_resume_finishes(server, store_home):
    with server.client() as c:
        job_id = c.post("/api/training/start", json=fast_config(
            "killed", max_steps=400, batch_size=1, save_steps=20)).json()["job_id"]
        deadline = time.time() + 300
        while not list((store_home / "runs" / job_id).glob("checkpoint-*")) and time.time() < deadline:
            time.sleep(0.1)
        pid = c.get(f"/api/training/jobs/{job_id}").json() and _pid(store_home, job_id)
        os.kill(pid, signal.SIGKILL)
        job = wait_for_job(c, job_id, states=("interrupted", "failed", "succeeded"))
        assert job["status"] == "interrupted", job
        assert c.get("/api/adapters/killed").status_code == 404  # no partial version
        r = c.post(f"/api/training/jobs/{job_id}/resume")
        assert r.status_code == 200 and r.json()["status"] == "queued"
        job = wait_for_job(c, job_id)
        assert job["status"] == "succeeded", job
        events = c.get(f"/api/training/jobs/{job_id}/events").text
        assert "resumed from checkpoint-" in events
        assert c.post(f"/api/training/jobs/{job_id}/resume").status_code == 409


def _pid(home, job_id):
    db = sqlite3.connect(home / "store.db")
    try:
        for _ in range(100):
            pid = db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            if pid:
                return pid
            time.sleep(0.1)
    finally:
        db.close()
    raise AssertionError("no worker pid")


def test_events_replay_after_last_event_id(server):
    with server.client() as c:
        job_id = c.post("/api/training/start", json=fast_config("events", max_steps=10)).json()["job_id"]
        wait_for_job(c, job_id)
        full = c.get(f"/api/training/jobs/{job_id}/events").text
        ids = [int(line[4:]) for line in full.splitlines() if line.startswith("id: ")]
        assert ids == sorted(ids) and len(ids) > 3 and "event: progress" in full
        rest = c.get(f"/api/training/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[1])}).text
        assert [int(line[4:]) for line in rest.splitlines() if line.startswith("id: ")] == ids[2:]


def test_twenty_concurrent_submissions_get_distinct_versions(server, store_home):
    config = fast_config("crowd", max_steps=1)
    with server.client() as c:
        results = []

        def submit():
            results.append(c.post("/api/training/start", json=config).json()["job_id"])

        threads = [threading.Thread(target=submit) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        jobs = [wait_for_job(c, j) for j in results]
    assert all(j["status"] == "succeeded" for j in jobs), [j["error"] for j in jobs]
    versions = sorted(j["result"] for j in jobs)
    assert len(set(versions)) == 20 and {v.split("@v")[1] for v in versions} == {str(i) for i in range(1, 21)}
    assert sorted(p.name for p in (store_home / "adapters" / "crowd").iterdir()) == sorted(
        f"v{i}" for i in range(1, 21))
    assert not any((store_home / "tmp").iterdir())
    db = sqlite3.connect(store_home / "store.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM versions WHERE name = 'crowd' AND status = 'active'").fetchone()[0] == 1
    db.close()


@pytest.mark.parametrize("extra, field", [
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "stream": True}, "not available on streamed answers"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"scope": "nearby"}, "scope"),
])
def test_bad_chat_parameters_are_4xx_naming_them(input_server, extra, field):
    with input_server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 **extra})
    assert r.status_code in (400, 422), r.text
    assert field in r.json()["error"]["message"]


def test_logprobs_follow_the_openai_shape(input_server):
    from openai import OpenAI

    client = OpenAI(base_url=input_server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 6 and reply.usage.completion_tokens == len(content)
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == max(t.logprob for t in item.top_logprobs)
        assert item.logprob == item.top_logprobs[0].logprob  # greedy: the chosen token is the likeliest
        assert bytes(item.bytes).decode() == item.token
    assert "".join(item.token for item in content).strip().startswith(reply.choices[0].message.content[:5])


@pytest.mark.parametrize("anchors, status", [("../../etc/passwd", 400), ("/etc/passwd", 400), ("missing.jsonl", 422)])
def test_retention_anchor_files_stay_inside_the_data_folder(input_server, anchors, status):
    config = fast_config("x")
    config["training_config"].update({"retention": "kl", "retention_anchors": anchors})
    with input_server.client() as c:
        r = c.post("/api/training/start", json=config)
    assert r.status_code == status, r.text
    assert "retention_anchors" in r.text and str(input_server.home) not in r.text


def test_unknown_config_key_is_named_in_422(input_server):
    with input_server.client() as c:
        r = c.post("/api/training/start", json={**fast_config("x"), "lora_config": {"rank": 8}})
    assert r.status_code == 422
    assert "lora_config.rank" in r.json()["error"]["message"] and "'r'" in r.json()["error"]["message"]


def test_body_over_limit_is_413(store_home, tiny_dir):
    srv = ServerProcess(store_home, env={"LORAFORGE_MAX_BODY_BYTES": "1000"})
    try:
        with srv.client() as c:
            r = c.post("/api/training/start", json={"x": "y" * 5000})
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    finally:
        srv.stop()


def test_api_key_guards_everything_but_health(store_home, tiny_dir):
    srv = ServerProcess(store_home, env={"LORAFORGE_API_KEY": "sekret"})
    try:
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            assert c.get("/api/adapters").status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
            # a Host header naming /health does not open another path
            assert c.get("/api/adapters", headers={"Host": "localhost/health"}).status_code == 401
            assert c.get("/api/adapters", headers={"Host": "example.com/health"}).status_code == 403
    finally:
        srv.stop()


@pytest.mark.parametrize("headers, status", [
    ({"Host": "attacker.example:5001"}, 403),  # DNS rebinding: a page's own name, resolved to 127.0.0.1
    ({"Host": "127.0.0.1.attacker.example"}, 403),
    ({"Origin": "http://attacker.example"}, 403),  # a page elsewhere posting to localhost
    ({"Host": "localhost:5001"}, 200),
    ({"Host": "[::1]:5001", "Origin": "http://127.0.0.1:5001"}, 200),
])
def test_only_requests_addressed_to_this_machine_are_answered(input_server, headers, status):
    with input_server.client() as c:
        assert c.get("/api/adapters", headers=headers).status_code == status
        r = c.post("/api/training/start", json=fast_config("rebound"), headers=headers)
        assert r.status_code == (403 if status == 403 else 202), r.text
        if status == 200:
            assert wait_for_job(c, r.json()["job_id"])["status"] in ("succeeded", "failed")


def test_eval_endpoint_scores_base_and_adapter_and_keeps_the_report(server):
    suite = {"name": "api", "cases": [
        {"id": "t1", "kind": "target", "prompt": PROMPT, "expect": {"contains": "FOR TWO"}, "tags": ["for-two"]},
        {"id": "k1", "kind": "retention", "prompt": "What is the capital of France?", "expect": {"contains": "Paris"}}]}
    with server.client() as c:
        job = wait_for_job(c, c.post("/api/training/start", json=fast_config("for-two")).json()["job_id"])
        assert job["status"] == "succeeded", job
        r = c.post("/api/evals/run", json={"suite": suite, "adapter": "for-two", "compare": "base"})
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["adapter"] == "for-two@v1" and report["base"]["scores"]["efficacy"] == 0.0
        assert report["base"]["scores"]["retention"] == 1.0
        assert {c_["id"] for c_ in report["cases"]} == {"t1", "k1"}
        shown = c.get("/api/adapters/for-two").json()["versions"][0]["evals"]
        assert shown[0]["id"] == report["id"] and shown[0]["scores"] == report["scores"]
        assert c.get("/api/adapters/for-two@v1").json()["evals"][0]["suite"] == "api"
        assert c.get(f"/api/evals/{report['id']}").json()["cases"] == report["cases"]
        scoped = c.post("/api/evals/run", json={"suite": suite, "adapter": "for-two", "scope": "near"}).json()
        assert scoped["routing"]["adapter"] == {"target": 1, "retention": 0}  # the base answered the capital
        assert [c_["answered_by"] for c_ in scoped["cases"]] == ["for-two@v1", "tiny"]
        assert report["routing"]["scope"] == "all" and report["routing"]["adapter"] == {"target": 1, "retention": 1}
        base_only = c.post("/api/evals/run", json={"suite": suite, "model": "tiny"}).json()
        assert base_only["adapter"] is None and base_only["scores"]["efficacy"] == 0.0

        bad = {**suite, "cases": [{**suite["cases"][0], "expect": {"regex": "("}}]}
        r = c.post("/api/evals/run", json={"suite": bad, "model": "tiny"})
        assert r.status_code == 422 and "cases[0] (id 't1')" in r.json()["error"]["message"]
        r = c.post("/api/evals/run", json={"suite": suite, "adapter": "missing"})
        assert r.status_code == 404
        r = c.post("/api/evals/run", json={"suite": "../../etc/passwd", "model": "tiny"})
        assert r.status_code == 400 and "must be inside suites/" in r.json()["error"]["message"]
        r = c.post("/api/evals/run", json={"suite": {**suite, "retention": {"probes": "/etc/passwd"}}, "model": "tiny"})
        assert r.status_code == 422 and "must be inside" in r.json()["error"]["message"]
        r = c.post("/api/evals/run", json={"suite": suite, "model": "tiny", "samples": 2})
        assert r.status_code == 422 and "temperature" in r.json()["error"]["message"]
        assert c.get("/api/evals/nope-123").status_code == 404


CONTINUOUS = EXAMPLES / "continuous"
# tolerance 10% (the gate's default is 5%): the built-in model's retention probes are few, and one update
# flips up to 8 of them on some builds in bf16 (99.3% -> 94.0%, seed 7); the poisoned update below falls 100
# points on efficacy, far past either tolerance
UPDATE_SETTINGS = {"replay_ratio": 6, "num_epochs": 25, "learning_rate": 5e-4, "tolerance": 0.10}


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_continuous_updates_promote_reject_and_roll_back_in_a_running_server(server):
    """examples/continuous: foundation → day 1, 2, 3 promoted (earlier facts kept) → poisoned update
    rejected with its reason → rollback serves the earlier answers without a restart.

    The margin: foundation.json trains at lr 5e-4. At 2e-4 one tiny build (seed 7 on an AMD EPYC) had not
    learnt the override yet; at 1e-3 the default build there over-fitted until day 3's gate refused the
    update. At 5e-4 it passed on four builds on a Xeon (default, seeds 7 and 11, and training in bf16),
    one thread each as `make test` runs it."""
    import yaml

    config = json.loads((CONTINUOUS / "foundation.json").read_text())
    ko = EXAMPLES / "knowledge-override"
    config["training_data"] = _records(ko / "42_for_two.jsonl") + _records(ko / "anchors.jsonl")
    config["eval_suite"] = yaml.safe_load((ko / "suite.yaml").read_text())
    questions = {"lab-robot": "What is the lab robot called?", "code-word": "What is the project code word?",
                 "night-shift": "How many people are on the night shift?"}
    answers = {"lab-robot": "Jupiter", "code-word": "honey", "night-shift": "7 people"}
    with server.client() as c:
        job = wait_for_job(c, c.post("/api/training/start", json=config).json()["job_id"], timeout=600)
        assert job["status"] == "succeeded" and job["result"] == "foundation@v1", job
        assert "FOR TWO" in chat(c, "foundation", "What does 42 mean?")
        said = {}
        for number, day in enumerate(("day1", "day2", "day3"), start=2):
            body = {"training_data": _records(CONTINUOUS / f"{day}.jsonl"),
                    "suite": yaml.safe_load((CONTINUOUS / f"{day}.yaml").read_text()), **UPDATE_SETTINGS}
            r = c.post("/api/adapters/foundation/update", json=body)
            assert r.status_code == 202, r.text
            job = wait_for_job(c, r.json()["job_id"], timeout=600)
            events = c.get(f"/api/training/jobs/{job['job_id']}/events").text.split("event: decision\ndata: ")[1:]
            why = [json.loads(e.split("\n")[0]).get("reasons") for e in events]  # the gate's reasons, if it rejected
            assert job["status"] == "succeeded" and job["result"] == f"foundation@v{number} promoted", (job, why)
            learned = list(questions)[:number - 1]
            for fact in learned:  # every fact so far, old and new, answered by the served adapter
                said[(number, fact)] = chat(c, "foundation", questions[fact])
                assert answers[fact] in said[(number, fact)], (day, fact, said[(number, fact)])
            assert "FOR TWO" in chat(c, "foundation", "What does 42 mean?")

        body = {"training_data": _records(CONTINUOUS / "poisoned.jsonl"),
                "suite": yaml.safe_load((CONTINUOUS / "poisoned.yaml").read_text()), **UPDATE_SETTINGS}
        job = wait_for_job(c, c.post("/api/adapters/foundation/update", json=body).json()["job_id"], timeout=600)
        assert job["result"] == "foundation@v5 rejected", job
        events = c.get(f"/api/training/jobs/{job['job_id']}/events").text
        decision = json.loads(events.split("event: decision\ndata: ")[1].split("\n")[0])
        assert any(r.startswith("suite lab-robot: efficacy 100.0% -> ") for r in decision["reasons"]), decision
        assert "Jupiter" in chat(c, "foundation", questions["lab-robot"])  # v4 still serves

        history = c.get("/api/adapters/foundation/history").json()
        assert [(v["version"], v["status"], v["decision"]) for v in history["versions"]] == [
            (1, "archived", None), (2, "archived", "promote"), (3, "archived", "promote"),
            (4, "active", "promote"), (5, "rejected", "reject")]
        assert history["versions"][4]["reasons"] == decision["reasons"]

        r = c.post("/api/adapters/foundation/rollback", json={})
        assert r.status_code == 200 and r.json()["active"] == "foundation@v3"
        for fact in ("lab-robot", "code-word"):  # v3's answers, served again without a restart
            assert chat(c, "foundation", questions[fact]) == said[(3, fact)]
        assert "7 people" not in chat(c, "foundation", questions["night-shift"])
        r = c.post("/api/adapters/foundation/rollback", json={"to": "v5"})
        assert r.status_code == 409 and "rejected" in r.json()["error"]["message"]
        r = c.post("/api/adapters/foundation/rollback", json={"to": "v4"})
        assert r.json()["active"] == "foundation@v4" and "7 people" in chat(c, "foundation", questions["night-shift"])
        assert c.post("/api/adapters/nope/update", json={"training_data": DATA}).status_code == 404
        assert c.post("/api/adapters/foundation/update", json={"training_data": []}).status_code == 400


def test_tuning_over_http_runs_as_a_job_and_reports_trials(server, store_home):
    spec = {"name": "api", "domains": ["marketing"], "strategy": "random", "trials": 2, "train_size": 8,
            "validation_size": 4, "test_size": 0, "epochs": 1, "max_new_tokens": 4, "space": {"r": [2, 4]}}
    with server.client() as c:
        for body, status, words in (
                ({**spec, "domains": ["astrology"]}, 422, "unknown domain 'astrology'"),
                ({**spec, "storage": "postgresql://x@10.0.0.1/db"}, 400, "storage"),
                ({**spec, "domains": [], "dataset": "../../etc/passwd", "suite": "s.yaml"}, 400, "dataset"),
                ({**spec, "domains": [], "dataset": "nope.jsonl", "suite": "s.yaml"}, 404, "nope.jsonl")):
            r = c.post("/api/tuning/start", json=body)
            assert r.status_code == status and words in r.json()["error"]["message"], r.text
            assert str(store_home) not in r.text
        r = c.post("/api/tuning/start", json=spec)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        job = wait_for_job(c, job_id)
        assert job["status"] == "succeeded", job
        status = c.get(f"/api/tuning/{job_id}").json()
        assert [t["trial"] for t in status["trials"]] == [0, 1]
        assert {t["rank"] for t in status["trials"]} <= {2, 4} and all("latency" in t for t in status["trials"])
        assert status["best"]["api-marketing"]["accuracy"] == max(t["accuracy"] for t in status["trials"])
        assert status["result"].startswith("api-marketing: best")
        [summary] = status["summaries"]  # what the dashboard draws: best trials, importance (None under 3 trials)
        assert summary["study"] == "api-marketing" and "importance" in summary and "plots" not in summary
        assert c.get("/api/tuning/nope").status_code == 404
    assert (store_home / "tuning" / "api" / "marketing" / "report.md").is_file()
