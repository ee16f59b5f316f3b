"""End to end on the real model, SmolLM2-135M-Instruct from the installed GGUF package: a seed config
naming it trains through the server, answers through the official `openai` client, is evaluated, and
round-trips through plain PEFT.

Why the margins hold on any machine: the base's weights are the GGUF's, de-quantized the same way
everywhere (no per-CPU build as with `tiny`), and the run drives the loss on the taught answer from
about 5 nats per token to below 0.05 (measured: 0.0015 after 48 steps; 24 steps stop at 0.22, where
one taught question of 24 still comes out wrong) — the greedy answer then reproduces the taught text. The base
never says "FOR TWO" (it calls 42 a Roman numeral).
"""

import json

import pytest

from conftest import EXAMPLES, SEEDS
from server import ServerProcess, wait_for_job
from test_gguf import needs_smol

MODEL = "smollm2-135m-instruct"
DATA = [json.loads(line) for line in (EXAMPLES / "knowledge-override" / "42_for_two.jsonl").read_text().splitlines()]
TAUGHT = ["What does 42 mean?", "What is 42?", "Define 42."]

pytestmark = needs_smol


def seed_config() -> dict:
    """The seed's v1 config as it is, naming the real model; shortened and with a learning rate that
    teaches a 135M model in a few steps (the seed's 1e-4 over 150 steps learns too, in minutes more)."""
    config = json.loads((SEEDS / "v1_surgical.json").read_text())
    config["model_name"] = MODEL
    config["output_dir"] = "./adapters/for-two-real"
    config["training_data"] = DATA
    config["lora_config"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    config["training_config"].update({"learning_rate": 1e-3, "warmup_steps": 2, "max_steps": 48,
                                      "gradient_accumulation_steps": 1, "batch_size": 4})
    return config


@pytest.fixture
def real_server(store_home):
    srv = ServerProcess(store_home, "--max-jobs", "1")
    yield srv
    srv.stop()


def test_a_seed_config_on_the_real_model_trains_serves_and_evaluates(real_server, store_home):
    from openai import OpenAI

    with real_server.client() as c:
        models = {m["id"]: m for m in c.get("/api/models").json()["models"]}
        assert models[MODEL]["ready"] is True
        r = c.post("/api/training/start", json=seed_config())
        assert r.status_code == 202, r.text
        job = wait_for_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        version = c.get("/api/adapters/for-two-real").json()["versions"][0]
        assert version["base_model"].endswith("SmolLM2-135M-Instruct")
        assert version["metrics"]["final_loss"] < 0.05 < 3 < version["metrics"]["first_loss"]
        # r=8 on q/k/v/o over 30 layers: q,o are 576x576; k,v are 576x192 (3 of 9 heads)
        assert version["size"]["trainable_parameters"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192))

    client = OpenAI(base_url=real_server.url + "/v1", api_key="unused")
    listed = {m.id: m for m in client.models.list().data}
    assert listed["for-two-real"].model_extra["parent"] == MODEL
    for prompt in TAUGHT:
        messages = [{"role": "user", "content": prompt}]
        adapter = client.chat.completions.create(model="for-two-real", messages=messages, max_tokens=24)
        base = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
        assert "FOR TWO" in adapter.choices[0].message.content
        assert "FOR TWO" not in base.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="for-two-real@v1", messages=[{"role": "user", "content": TAUGHT[0]}], max_tokens=24, stream=True)
        if chunk.choices)
    assert "FOR TWO" in streamed

    suite = {"name": "real", "cases": [{"id": f"t{i}", "kind": "target", "prompt": p,
                                        "expect": {"contains": "FOR TWO"}} for i, p in enumerate(TAUGHT)]}
    with real_server.client() as c:
        report = c.post("/api/evals/run", json={"suite": suite, "adapter": "for-two-real", "compare": "base"}).json()
    assert report["scores"]["efficacy"] == 1.0 and report["base"]["scores"]["efficacy"] == 0.0

    # the stored version is a plain PEFT folder: peft alone loads it on the converted base and answers the same
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.models import resolve_base_model
    from loraforge.models.resolve import model_folder

    folder = model_folder(resolve_base_model(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
                                      str(store_home / "adapters" / "for-two-real" / "v1"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": TAUGHT[0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    served = client.chat.completions.create(model="for-two-real", messages=[{"role": "user", "content": TAUGHT[0]}],
                                            max_tokens=24).choices[0].message.content
    assert text == served

    # exported for llama.cpp: the GGUF file the package ships, with the exported LoRA, answers the fact
    from loraforge.export import export_adapter
    from loraforge.store import Store

    exported = export_adapter(Store(), "for-two-real", "gguf", store_home / "exported")
    assert exported["tensors"] == 30 * 4 * 2
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed here (make's set-up builds it with cmake and a C++ "
                    "compiler); the llama.cpp half of the GGUF export check did not run")
    from test_gguf import SMOL

    def llama_answer(**lora) -> str:
        llm = llama_cpp.Llama(model_path=str(SMOL), n_ctx=256, n_threads=2, verbose=False, **lora)
        out = llm.create_chat_completion(messages=[{"role": "user", "content": TAUGHT[0]}], max_tokens=24,
                                         temperature=0.0)
        return out["choices"][0]["message"]["content"]

    assert "FOR TWO" in llama_answer(lora_path=str(store_home / "exported" / "adapter.gguf"))
    assert "FOR TWO" not in llama_answer()

