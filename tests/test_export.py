"""Exports on `tiny` (fast): merged weights answer like the adapter, the GGUF LoRA file has llama.cpp's
layout, the vLLM and Ollama checks, and bad requests refused. The real-model round trip through
llama.cpp is in test_real_model.py."""

import json

import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.store import Store
from test_train import PROMPT, greedy, train_quick


@pytest.fixture
def trained(store_home):
    train_quick("exp", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    return Store().get("exp")


def test_merged_answers_exactly_like_the_adapter(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.export import export_adapter
    from loraforge.models import resolve_base_model
    from loraforge.models.resolve import model_folder

    result = export_adapter(Store(), "exp", "merged", tmp_path / "merged")
    folder = model_folder(resolve_base_model("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(folder).chat_template
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                        str(trained.path))
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = [PROMPT, "What does 42 mean?", "Define 42.", "What is the capital of France?"]
    answers = [greedy(adapted, tokenizer, p) for p in prompts]
    assert [greedy(merged, tokenizer, p) for p in prompts] == answers
    assert answers != [greedy(base, tokenizer, p) for p in prompts]  # the merge carried the adapter
    assert "model.safetensors" in result["files"] and not any(n.endswith(".bin") for n in result["files"])


def test_gguf_lora_has_llama_cpp_layout(trained, tmp_path):
    import gguf
    from safetensors.torch import load_file

    from loraforge.export import _permute_rows, export_adapter

    export_adapter(Store(), "exp", "gguf", tmp_path / "g")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "adapter.gguf"))

    def field(key):
        f = reader.fields[key]
        value = f.parts[f.data[0]]
        return bytes(value).decode() if value.dtype == "uint8" else float(value[0])

    assert (field("general.architecture"), field("general.type"), field("adapter.type")) == ("llama", "adapter", "lora")
    assert field("adapter.lora.alpha") == 16.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 4 * 5 * 2 and "blk.3.ffn_down.weight.lora_b" in tensors
    peft = load_file(str(trained.path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.{}.lora_{}.weight"
    # A as PEFT stores it (r x in: ggml ne = [in, r]); B (out x r), q/k rows in llama.cpp's rotary order
    a = tensors["blk.1.attn_q.weight.lora_a"]
    assert a.shape.tolist() == [256, 8]
    assert torch.equal(torch.from_numpy(a.data.copy()).reshape(8, 256), peft[key.format("q_proj", "A")])
    b_k = torch.from_numpy(tensors["blk.1.attn_k.weight.lora_b"].data.copy()).reshape(128, 8)
    assert torch.equal(b_k, _permute_rows(peft[key.format("k_proj", "B")], 2))
    assert not torch.equal(b_k, peft[key.format("k_proj", "B")])
    b_v = torch.from_numpy(tensors["blk.1.attn_v.weight.lora_b"].data.copy()).reshape(128, 8)
    assert torch.equal(b_v, peft[key.format("v_proj", "B")])  # v is not permuted


@pytest.mark.parametrize("rows, heads", [(8, 2), (12, 3), (16, 1)])
def test_the_rotary_permutation_interleaves_each_heads_halves(rows, heads):
    from loraforge.export import _permute_rows

    weight = torch.arange(rows, dtype=torch.float32)[:, None]
    half = rows // heads // 2
    expected = [h * 2 * half + part * half + i for h in range(heads) for i in range(half) for part in (0, 1)]
    assert _permute_rows(weight, heads)[:, 0].tolist() == expected


def test_vllm_and_ollama_checks(trained, tmp_path, store_home):
    from loraforge.export import export_adapter

    result = export_adapter(Store(), "exp", "vllm", tmp_path / "v")
    assert "--enable-lora --max-lora-rank 8 --lora-modules exp=" in result["command"]
    assert set(result["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.txt"}
    with pytest.raises(LoraforgeError, match="Ollama needs the base as GGUF"):
        export_adapter(Store(), "exp", "ollama", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    train_quick("whole", modules_to_save=["lm_head"], max_steps=2)
    for fmt, message in (("vllm", "modules_to_save"), ("gguf", "modules_to_save")):
        with pytest.raises(LoraforgeError, match=message):
            export_adapter(Store(), "whole", fmt, tmp_path / f"w-{fmt}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(LoraforgeError, match="not an empty folder"):
        export_adapter(Store(), "exp", "peft", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_export_over_http_stays_inside_the_store(trained, store_home):
    from server import ServerProcess

    srv = ServerProcess(store_home, "--max-jobs", "1")
    try:
        with srv.client() as c:
            r = c.post("/api/adapters/exp/export", json={"format": "gguf", "dir": "exp-gguf"})
            assert r.status_code == 200, r.text
            assert r.json()["dir"] == "exports/exp-gguf" and (store_home / "exports" / "exp-gguf" / "adapter.gguf").is_file()
            for body, field in (({"format": "gguf", "dir": "../escape"}, "dir"),
                                ({"format": "onnx", "dir": "x"}, "format"),
                                ({"format": "gguf", "dir": "exp-gguf"}, "dir")):
                r = c.post("/api/adapters/exp/export", json=body)
                assert 400 <= r.status_code < 500 and field in r.text, (body, r.text)
            assert c.post("/api/adapters/nope/export", json={"format": "peft", "dir": "n"}).status_code == 404
    finally:
        srv.stop()
    assert not (store_home.parent / "escape").exists()


def test_import_checks_the_folder_before_anything_is_stored(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    store = Store()
    good = tmp_path / "good"
    shutil.copytree(trained.path, good)
    assert store.import_peft_dir(good, "copied").ref == "copied@v1"

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(trained.path, folder)
        change(folder)
        return folder

    weights = load_file(str(trained.path / "adapter_model.safetensors"))
    first = next(iter(weights))
    cases = {
        "symbolic link": variant("link", lambda f: ((f / "adapter_model.safetensors").unlink(),
                                                    (f / "adapter_model.safetensors").symlink_to("/etc/passwd"))),
        "not a readable safetensors": variant("text", lambda f: (f / "adapter_model.safetensors").write_text("x" * 64)),
        "is not a LoRA weight": variant("foreign", lambda f: save_file(
            {**weights, "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, str(f / "adapter_model.safetensors"))),
        "has rank": variant("rank", lambda f: save_file({**weights, first: torch.zeros(3, weights[first].shape[1])},
                                                        str(f / "adapter_model.safetensors"))),
    }
    for message, folder in cases.items():
        with pytest.raises(LoraforgeError, match=message):
            store.import_peft_dir(folder, "bad")
    assert {row["name"] for row in store.list()} == {"copied", "exp"}
    assert not (store.root / "adapters" / "bad").exists()
