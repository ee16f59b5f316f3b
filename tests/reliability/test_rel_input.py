"""Bad input: oversized bodies and headers, malformed JSON, out-of-range parameters, bad training data, races on
one name, and a schema-driven fuzz of the live API. Every answer is a JSON 4xx; no job is created by a refusal;
the server lives on."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from relhelp import assert_refusal
from server import ServerProcess, wait_for_job
from test_server import fast_config, input_server  # noqa: F401 (fixture)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _jobs(client) -> int:
    return len(client.get("/api/training/jobs").json()["jobs"])


def _alive(client) -> None:
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_50_mb_body_is_413_before_it_is_read(input_server):
    big = b'{"x": "' + b"y" * (50 * 1024 * 1024) + b'"}'
    with input_server.client() as c:
        for path in ("/api/training/start", "/v1/chat/completions", "/api/evals/run"):
            assert_refusal(c.post(path, content=big, headers={"Content-Type": "application/json"}), (413,))

            def chunks():  # no Content-Length: counted while it streams in
                for start in range(0, len(big), 1 << 20):
                    yield big[start:start + (1 << 20)]
            try:
                r = c.post(path, content=chunks(), headers={"Content-Type": "application/json"})
                assert_refusal(r, (413,))
            except httpx.RemoteProtocolError:
                pass  # the server answered 413 and closed before the client finished sending: also a refusal
        _alive(c)


def test_a_1_mb_header_is_refused_and_the_server_lives(input_server):
    host, port = "127.0.0.1", input_server.port
    with socket.create_connection((host, port), timeout=30) as s:
        reply = b""
        try:  # the server may answer and close before the header is even sent in full
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except OSError:
            pass
    assert reply == b"" or reply.split(b" ")[1].startswith(b"4"), reply[:200]  # 431/400, or the connection cut
    with input_server.client() as c:
        _alive(c)


@pytest.mark.parametrize("path", ["/api/training/start", "/v1/chat/completions", "/api/evals/run",
                                  "/api/tuning/start", "/api/adapters/x/update", "/api/models/import"])
@pytest.mark.parametrize("body, content_type", [
    ('"s"', "application/json"), ("[]", "application/json"), ("42", "application/json"),
    ("null", "application/json"), ('{"model": "tiny", "messages": [', "application/json"), ("", "application/json"),
    ("\xff\xfe", "application/json"), ('{"model": "tiny"}', "text/plain"),
    ("model=tiny", "application/x-www-form-urlencoded"),
    ('{"a": ' * 5000 + "1" + "}" * 5000, "application/json"),
])
def test_malformed_bodies_get_json_4xx_and_create_nothing(input_server, path, body, content_type):
    with input_server.client() as c:
        jobs = _jobs(c)
        r = c.post(path, content=body.encode("latin-1"), headers={"Content-Type": content_type})
        assert_refusal(r, (400, 404, 413, 415, 422))
        assert _jobs(c) == jobs


@pytest.mark.parametrize("extra", [{"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 10**9}, {"n": 10**6},
                                   {"n": 0}, {"temperature": -1}, {"temperature": float("inf")}, {"top_p": 0},
                                   {"seed": 2**80}, {"stop": ["a"] * 50}, {"messages": []},
                                   {"messages": [{"role": "wizard", "content": "hi"}]},
                                   {"messages": [{"role": "user", "content": "x" * 100_000}]}])
def test_out_of_range_chat_parameters_are_4xx(input_server, extra):
    with input_server.client() as c:
        body = json.dumps({**CHAT, **extra}, allow_nan=True)
        r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert_refusal(r, (400, 413, 422))


@pytest.mark.parametrize("data, words", [
    ([{"instruction": "What is 42?", "output": "FOR TWO"}, {"instruction": "Define 42.", "output": "a\x00b"}],
     "record 2"),
    ([{"instruction": "q"}], "record 1: missing key 'output'"),
    ([], "no records"),
    ([{"instruction": "q", "output": "a"}, {"question": "q", "answer": "a"}], "record 2"),
    ([{"instruction": "q", "output": ""}], "record 1"),
    ([{"instruction": 42, "output": "a"}], "record 1"),
    ([{"messages": [{"role": "user", "content": "q"}]}], "record 1"),
    ([42], "record 1: expected a JSON object"),
])
def test_bad_training_data_is_refused_naming_the_record_and_no_job_is_created(input_server, data, words):
    with input_server.client() as c:
        jobs = _jobs(c)
        assert_refusal(c.post("/api/training/start", json={**fast_config("bad-data"), "training_data": data}),
                       (400,), words=words)
        assert _jobs(c) == jobs


@pytest.mark.parametrize("raw, words", [(b"\xff\xfe not utf-8\n", "not UTF-8"), (b"", "empty"),
                                        (b'{"instruction": "q", "output": "a\\u0000"}\n', "NUL"),
                                        (b'{"instruction": "q", "output": "a"}\n{"instruction": ', "line 2")])
def test_bad_training_files_are_refused_uploaded_or_in_the_data_folder(input_server, raw, words):
    home = input_server.home
    (home / "data").mkdir(exist_ok=True)
    (home / "data" / "bad.jsonl").write_bytes(raw)
    with input_server.client() as c:
        jobs = _jobs(c)
        assert_refusal(c.post("/api/training/start", json={**fast_config("bad-file"), "training_data": "bad.jsonl"}),
                       (400,), words=words, home=home)
        config = {k: v for k, v in fast_config("bad-file").items() if k != "training_data"}
        r = c.post("/api/training/start", data={"config": json.dumps(config)},
                   files={"training_data": ("bad.jsonl", raw, "application/jsonl")})
        assert_refusal(r, (400,), words=words, home=home)
        assert _jobs(c) == jobs
    (home / "data" / "bad.jsonl").unlink()


@pytest.mark.parametrize("section, key, value, words", [
    ("lora_config", "r", 0, "r"), ("lora_config", "r", -8, "r"), ("lora_config", "lora_dropout", 1.5, "lora_dropout"),
    ("lora_config", "target_modules", [], "target_modules"),
    ("lora_config", "target_modules", ["no_such_layer"], "no_such_layer"),
    ("training_config", "learning_rate", "NaN", "learning_rate"),
    ("training_config", "learning_rate", "Infinity", "learning_rate"),
    ("training_config", "max_seq_length", 10**7, "max_seq_length"),
    ("training_config", "batch_size", 0, "batch_size"), ("training_config", "num_epochs", 10**9, "num_epochs"),
    ("training_config", "max_steps", -2, "max_steps"),  # -1 is "not set", as in transformers
])
def test_impossible_settings_are_422_naming_them(input_server, section, key, value, words):
    config = fast_config("impossible")
    config[section][key] = value
    body = json.dumps(config).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    with input_server.client() as c:
        jobs = _jobs(c)
        r = c.post("/api/training/start", content=body, headers={"Content-Type": "application/json"})
        assert_refusal(r, (400, 422), words=words)
        assert _jobs(c) == jobs


def test_twenty_exports_to_one_new_folder_at_once_exactly_one_succeeds(store_home, tiny_dir):
    srv = ServerProcess(store_home)
    try:
        with srv.client() as c:
            job = c.post("/api/training/start", json=fast_config("one", max_steps=2)).json()["job_id"]
            assert wait_for_job(c, job)["status"] == "succeeded"
        codes, barrier = [], threading.Barrier(20)

        def export():
            with srv.client() as c:
                barrier.wait()
                r = c.post("/api/adapters/one/export", json={"format": "peft", "dir": "same"})
                codes.append(r.status_code)
                if r.status_code != 200:
                    assert_refusal(r, (409, 422), words="same", home=store_home)

        threads = [threading.Thread(target=export) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes).count(200) == 1 and len(codes) == 20, codes
        exports = store_home / "exports"
        assert sorted(p.name for p in exports.iterdir()) == ["same"]  # no temporary folder left behind
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (exports / "same").iterdir()}
    finally:
        srv.stop()


# ---- a schema-driven fuzz of the live API ------------------------------------------------------------------
FUZZ_EXAMPLES = 12  # per operation; derandomized, so a run is repeatable and bounded


def test_fuzz_the_live_openapi_schema_no_5xx_no_schema_violations(input_server):
    """Every operation of the live /openapi.json with generated paths, queries and bodies (schemathesis): no
    5xx and every answer within the documented schema, errors included. Requests that would start work are
    sent too: they must be refused or queued. (Driven here rather than by schemathesis' pytest plugin, which
    does not load under pytest 9.)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)

    # what "no 5xx, no schema violation" means; not `positive_data_acceptance`, which expects any request that
    # fits the schema to succeed (a config naming a model that does not exist fits it, and is refused)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    schema = schemathesis.openapi.from_url(input_server.url + "/openapi.json")
    failures, sent = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        @given(case=operation.as_strategy())
        def call(case):
            response = case.call(base_url=input_server.url, timeout=120)
            sent[operation.label] = sent.get(operation.label, 0) + 1
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # noqa: BLE001 - collected, reported all at once below
                failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                raise

        try:
            call()
        except (Exception, BaseExceptionGroup):  # noqa: BLE001 - hypothesis re-raises what `failures` holds
            pass
    print(f"fuzz: {sum(sent.values())} requests over {len(sent)} operations, {len(failures)} failures")
    assert len(sent) >= 20 and sum(sent.values()) >= 100, sent
    assert not failures, "\n".join(sorted(set(failures)))
    with input_server.client() as c:
        _alive(c)
