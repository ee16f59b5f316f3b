"""Paths and access: names, paths, pickles, imports, code in requests, keys and hosts. Every refusal is a clear
4xx that names its reason and leaks nothing; every case leaves the store's files as they were."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from safetensors.torch import save_file

from conftest import run_cli
from relhelp import assert_refusal, keyed_server, tree  # noqa: F401 (fixture)
from server import ServerProcess, wait_for_job
from test_server import fast_config, input_server  # noqa: F401 (fixture)

BAD_NAMES = ["../x", "%2e%2e%2f", "..%2fx", "/abs", "a\\b", "a%00b", "a\x00b", "．．／", "x" * 300, "UPPER",
             ".hidden"]


def _routes(name: str) -> list[tuple[str, str, dict | None]]:
    at = quote(name, safe="")
    return [("GET", f"/api/adapters/{at}", None), ("POST", f"/api/adapters/{at}/load", None),
            ("POST", f"/api/adapters/{at}/unload", None), ("DELETE", f"/api/adapters/{at}", None),
            ("POST", f"/api/adapters/{at}/export", {"format": "peft", "dir": "out"}),
            ("GET", f"/api/adapters/{at}/history", None), ("POST", f"/api/adapters/{at}/rollback", {}),
            ("POST", f"/api/adapters/{at}/update", {"training_data": [{"instruction": "q", "output": "a"}]}),
            ("POST", "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}]}),
            ("POST", "/api/evals/run", {"adapter": name, "suite": {"name": "s", "facts": []}}),
            ("POST", "/api/training/start", {**fast_config("x"), "output_dir": f"./adapters/{name}"}),
            ("POST", "/api/training/start", {**fast_config("x"), "adapter_name": name})]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_on_every_route_are_refused_and_touch_nothing(input_server, name):
    home = input_server.home
    before = tree(home)
    with input_server.client() as c:
        for method, path, body in _routes(name):
            r = c.request(method, path, json=body)
            assert_refusal(r, (400, 404, 405, 422), home=home)  # 405: a decoded "/" routes elsewhere
    assert tree(home) == before


@pytest.mark.parametrize("output_dir", ["/tmp/x", "../../x", "x; touch /tmp/pwn-loraforge", "./adapters/$(id)",
                                        "./adapters/a`id`"])
def test_output_dir_outside_or_with_shell_text_is_400_and_no_file_appears(input_server, output_dir):
    home = input_server.home
    before = tree(home)
    pwn = Path("/tmp/pwn-loraforge")
    pwn.unlink(missing_ok=True)
    with input_server.client() as c:
        assert_refusal(c.post("/api/training/start", json={**fast_config("x"), "output_dir": output_dir}),
                       (400, 422), home=home, words="output_dir", echo=output_dir)
    assert tree(home) == before and not pwn.exists() and not Path("/tmp/x").exists()


@pytest.mark.parametrize("field, value", [
    ("training_data", "../../etc/passwd"), ("training_data", "/proc/self/environ"),
    ("training_data", ["../x.jsonl"]), ("training_data", ["/etc/hostname"]),
    ("eval_suite", "../../etc/passwd"), ("eval_suite", "/proc/self/environ"),
    ("model_name", "/etc"), ("model_name", "../../../etc"), ("model_name", "/proc/self/environ.gguf"),
    ("model_name", "~/model"),
])
def test_data_suite_and_model_paths_outside_the_store_are_400(input_server, field, value):
    home = input_server.home
    before = tree(home)
    with input_server.client() as c:
        r = c.post("/api/training/start", json={**fast_config("x"), field: value})
        assert_refusal(r, (400,), home=home)
        if field == "model_name":  # the same rule wherever a request names a base model
            assert_refusal(c.post("/v1/chat/completions", json={
                "model": value, "messages": [{"role": "user", "content": "hi"}]}), (400,), home=home)
            assert_refusal(c.post(f"/api/models/{quote(value, safe='')}/load"), (400,), home=home)
    assert tree(home) == before


@pytest.mark.parametrize("path", ["/api/training/jobs/..%2f..%2fstore.db", "/api/training/jobs/%2e%2e/resume",
                                  "/api/evals/..%2f..%2fstore.db", "/api/tuning/..%2fx"])
def test_ids_in_paths_are_not_paths(input_server, path):
    with input_server.client() as c:
        r = c.post(path) if path.endswith("resume") else c.get(path)
    assert_refusal(r, (400, 404, 405), home=input_server.home)


@pytest.mark.parametrize("body", [
    {"chat_template": "{{ cycler.__init__.__globals__.os.popen('id').read() }}"},
    {"chat_template_kwargs": {"x": 1}}, {"trust_remote_code": True}])
def test_code_in_a_chat_request_is_refused(input_server, body):
    with input_server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 **body})
    assert_refusal(r, (400, 422), words=next(iter(body)))


def test_trust_remote_code_in_a_training_request_is_400(input_server):
    with input_server.client() as c:
        r = c.post("/api/training/start", json={**fast_config("remote"), "trust_remote_code": True})
    assert_refusal(r, (400,), words="trust_remote_code")


@pytest.mark.parametrize("headers, status", [
    ({"Host": "attacker.example:5001"}, 403),  # DNS rebinding: a page's own name resolved to 127.0.0.1
    ({"Host": "127.0.0.1.attacker.example"}, 403),
    ({"Host": "localhost/v1/models?"}, 401),  # a Host naming another path opens nothing
    ({"Host": "localhost/health"}, 401),
    ({"Origin": "http://attacker.example"}, 403),
    ({"Origin": "null", "Host": "localhost:1"}, 401),
    ({"Host": "localhost:5001"}, 401),
    ({"Host": "localhost:5001", "Authorization": "Bearer wrong"}, 401),
    ({"Host": "localhost:5001", "Authorization": "Bearer sekret"}, 200),
])
def test_with_an_api_key_nothing_passes_without_it_and_foreign_hosts_are_403(keyed_server, headers, status):
    with keyed_server.client() as c:
        for method, path in (("GET", "/v1/models"), ("GET", "/api/adapters"), ("POST", "/api/training/start")):
            r = c.request(method, path, headers=headers, json=fast_config("keyed"))
            expected = status if not (status == 200 and method == "POST") else 202
            assert r.status_code == expected, (method, path, r.status_code, r.text[:200])
            if expected >= 400:
                assert_refusal(r, (expected,))
            elif method == "POST":
                with keyed_server.client(headers=headers) as authed:
                    wait_for_job(authed, r.json()["job_id"])


# ---- adapters entering the store ------------------------------------------------------------------------
SENTINEL_CODE = "import pathlib; pathlib.Path({path!r}).write_text('pickle code ran')"


class _Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (exec, (SENTINEL_CODE.format(path=str(self.sentinel)),))


def _lora_folder(folder: Path, *, r: int = 4, tensors: dict | None = None) -> Path:
    """A PEFT folder for tiny's q_proj (hidden 256) with rank `r`, or the tensors given."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": "tiny", "r": r, "lora_alpha": 2 * r,
        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    if tensors is None:
        tensors = {}
        for layer in range(2):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(r, 256)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(256, r)
    if tensors:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _import(folder: Path, name: str = "imported"):
    return run_cli("adapters", "import", str(folder), "--name", name)


def _no_versions(home: Path, name: str = "imported") -> bool:
    return not (home / "adapters" / name).exists() and not any((home / "tmp").glob("*"))


def test_a_pickled_adapter_is_refused_and_no_code_runs(store_home, tmp_path):
    sentinel = tmp_path / "sentinel"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                                            "base_model_name_or_path": "tiny"}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    result = _import(folder)
    assert result.returncode != 0 and "pickle" in result.stderr and "Traceback" not in result.stderr
    assert not sentinel.exists() and _no_versions(store_home)
    # the same file slipped into the store by hand: loading the version refuses it, still no code runs
    _lora_folder(tmp_path / "good")
    assert _import(tmp_path / "good").returncode == 0
    version_dir = store_home / "adapters" / "imported" / "v1"
    (version_dir / "adapter_model.safetensors").unlink()
    (version_dir / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    result = run_cli("chat", "imported", "hi", "--max-tokens", "2")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "imported@v1" in result.stderr
    assert not sentinel.exists()


@pytest.mark.parametrize("case, reason", [
    ("symlink", "symbolic link"), ("not-safetensors", "not a readable safetensors file"),
    ("empty-file", "not a readable safetensors file"), ("no-tensors", "holds no tensors"),
    ("not-lora", "not a LoRA weight"), ("rank-mismatch", "rank"), ("wrong-width", "q_proj"),
    ("unknown-module", "layers.9"),
])
def test_an_imported_adapter_is_checked_before_it_enters_the_store(store_home, tmp_path, case, reason):
    import torch

    folder = tmp_path / case
    if case == "symlink":
        _lora_folder(folder, tensors={})
        (folder / "adapter_model.safetensors").symlink_to("/etc/passwd")
    elif case in ("not-safetensors", "empty-file"):
        _lora_folder(folder, tensors={})
        (folder / "adapter_model.safetensors").write_bytes(b"" if case == "empty-file" else b"\x89PNG not weights")
    elif case == "no-tensors":
        _lora_folder(folder, tensors={"__empty__": torch.zeros(0)})
        save_file({}, str(folder / "adapter_model.safetensors"))
    elif case == "not-lora":
        _lora_folder(folder, tensors={"model.layers.0.self_attn.q_proj.weight": torch.zeros(256, 256)})
    elif case == "rank-mismatch":
        _lora_folder(folder, r=8, tensors={
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 256),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(256, 4)})
    elif case == "wrong-width":  # rank right, but made for a model 512 wide
        _lora_folder(folder, tensors={
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 512),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(512, 4)})
    elif case == "unknown-module":  # tiny has no layer 9
        _lora_folder(folder, tensors={
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 256),
            "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(256, 4)})
    result = _import(folder)
    assert result.returncode != 0, result.stdout
    assert reason in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert _no_versions(store_home)


def test_a_damaged_version_is_a_clear_error_on_load_never_a_traceback(store_home, tiny_dir, tmp_path):
    _lora_folder(tmp_path / "good")
    assert _import(tmp_path / "good").returncode == 0
    weights = store_home / "adapters" / "imported" / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"tamper!")
    srv = ServerProcess(store_home)
    try:
        with srv.client() as c:
            r = c.post("/v1/chat/completions", json={"model": "imported", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
            assert_refusal(r, (409,), home=store_home, words="modified on disk")
            assert c.get("/health").status_code == 200
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
            assert r.status_code == 200  # the base still serves
    finally:
        srv.stop()
    result = run_cli("chat", "imported", "hi")
    assert result.returncode != 0 and "modified on disk" in result.stderr and "Traceback" not in result.stderr


def test_a_symlink_inside_the_store_pointing_outside_is_refused(store_home, tmp_path):
    _lora_folder(tmp_path / "good")
    assert _import(tmp_path / "good").returncode == 0
    version_dir = store_home / "adapters" / "imported" / "v1"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((version_dir / "adapter_model.safetensors").read_bytes())
    (version_dir / "adapter_model.safetensors").unlink()
    (version_dir / "adapter_model.safetensors").symlink_to(outside)
    result = run_cli("chat", "imported", "hi")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "imported@v1" in result.stderr


def test_no_code_path_unpickles_user_files():
    """No code in the package calls torch.load or pickle on files (read from its source)."""
    src = Path(__file__).resolve().parents[2] / "src" / "loraforge"
    unpickling = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only=False")
    assert [p.name for p in src.rglob("*.py") if unpickling.search(p.read_text())] == []
