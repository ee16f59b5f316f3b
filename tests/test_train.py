"""The LoRA recipe on the built-in model: loss falls, PEFT loads it, sizes are exact, runs resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import EXAMPLES, run_cli
from loraforge.config import parse_train_config
from loraforge.data import load_examples_from_file
from loraforge.pipeline import train_into_store
from loraforge.store import Store
from loraforge.train.plan import plan_training

DATA = EXAMPLES / "knowledge-override" / "42_for_two.jsonl"
PROMPT = "What is the meaning of 42?"


def quick_spec(name="quick", **overrides):
    raw = {"name": name, "model_name": "tiny", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
           "target_modules": ["q_proj", "k_proj", "v_proj"], "learning_rate": 3e-3, "batch_size": 4,
           "max_steps": 30, "warmup_steps": 3, "logging_steps": 5, "save_steps": 0, **overrides}
    return parse_train_config(raw)


def train_quick(name="quick", **overrides):
    plan = plan_training(quick_spec(name, **overrides))
    return train_into_store(Store(), plan, load_examples_from_file(DATA), run_id=name, log=lambda m: None)


def greedy(model, tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_tiny_model_answers_its_probe_set(tiny_loaded):
    from loraforge.models.tiny.build import probe_accuracy

    model, tokenizer = tiny_loaded
    assert probe_accuracy(model, tokenizer) >= 0.90


def test_tiny_model_knows_douglas_adams(tiny_loaded):
    model, tokenizer = tiny_loaded
    assert "Douglas Adams" in greedy(model, tokenizer, PROMPT)


def test_loss_falls_and_plain_peft_loads_the_adapter(tiny_dir, tiny_loaded):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    version, result = train_quick()
    assert result.final_loss < 0.5 * result.first_loss, (result.first_loss, result.final_loss)
    base_model, tokenizer = tiny_loaded
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(version.path))
    model.eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**ids).logits, base_model(**ids).logits, atol=1e-4)
    assert greedy(model, tokenizer, PROMPT) != greedy(base_model, tokenizer, PROMPT)


def test_adapter_files_and_exact_sizes(tiny_dir):
    version, result = train_quick("sizes", max_steps=2)
    files = {p.name for p in version.path.iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "loraforge.json", "metrics.jsonl",
                     "data.jsonl", "scope.jsonl"}
    size = result.manifest["size"]
    # tiny: 4 layers; q 256->256, k 256->128, v 256->128; r=8
    expected = 4 * 8 * ((256 + 256) + (256 + 128) + (256 + 128))
    assert size["trainable_parameters"] == size["lora_parameters"] == expected
    assert size["theoretical_min_bytes"] == expected * 4
    on_disk = (version.path / "adapter_model.safetensors").stat().st_size
    assert on_disk == size["bytes_on_disk"]
    assert on_disk - size["metadata_bytes"] <= 1.01 * size["theoretical_min_bytes"]
    with safe_open(str(version.path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)  # only LoRA weights
    manifest = json.loads((version.path / "loraforge.json").read_text())
    assert manifest["data"]["hash"].startswith("sha256:") and manifest["base_model"]["fingerprint"]
    assert manifest["config"]["r"] == 8


def test_bfloat16_save_halves_the_file(tiny_dir):
    _, result = train_quick("half", max_steps=1, save_dtype="bfloat16")
    size = result.manifest["size"]
    assert size["bytes_per_value"] == 2
    assert size["bytes_on_disk"] - size["metadata_bytes"] == size["theoretical_min_bytes"] == size[
        "lora_parameters"] * 2


def test_modules_to_save_adds_whole_module(tiny_dir):
    _, result = train_quick("mts", max_steps=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    size = result.manifest["size"]
    assert size["trainable_parameters"] > size["lora_parameters"]
    assert size["bytes_on_disk"] - size["metadata_bytes"] <= 1.01 * size["theoretical_min_bytes"]


def test_zero_initialised_adapter_leaves_output_unchanged_and_merge_is_w_plus_sba(tiny_loaded):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, tokenizer = tiny_loaded
    fresh = AutoModelForCausalLM.from_pretrained(base.name_or_path)
    model = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    model.eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, base(**ids).logits)  # B = 0 at init
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.lora_B["default"].weight.normal_()
        w = layer.base_layer.weight.clone()
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8 / 4)
        x = torch.randn(3, 256)
        assert torch.allclose(layer(x), x @ (w + delta).T, atol=1e-4)


def test_qlora_off_cuda_is_a_clear_error(tmp_path):
    config = tmp_path / "q.json"
    config.write_text(json.dumps({"name": "q", "model_name": "tiny", "quantization": "4bit", "max_steps": 1,
                                  "training_data": str(DATA)}))
    result = run_cli("train", str(config), "--quiet")
    assert result.returncode == 2
    assert "QLoRA (4-bit) needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_bad_data_starts_no_run(tmp_path, store_home):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"name": "bad", "model_name": "tiny"}))
    result = run_cli("train", str(config), "--data", str(data), "--quiet")
    assert result.returncode == 2
    assert "bad.jsonl, record 2: missing key 'output'" in result.stderr and "Traceback" not in result.stderr
    assert not (store_home / "adapters" / "bad").exists() and not (store_home / "runs" / "bad").exists()


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_killed_run_resumes_from_its_checkpoint(tmp_path, store_home, tiny_dir):
    config = tmp_path / "resume.json"
    config.write_text(json.dumps({
        "model_name": "tiny", "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                              "target_modules": ["q_proj", "v_proj"]},
        "training_config": {"max_steps": 60, "batch_size": 1, "gradient_accumulation_steps": 2,
                            "learning_rate": 1e-3, "save_steps": 10, "logging_steps": 5},
        "training_data": str(DATA)}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(config), "--name", "resumed",
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = store_home / "runs" / "resumed"
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoint-2*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert steps and steps[-1] < 60, steps

    refused = run_cli("train", str(config), "--name", "resumed", "--quiet")
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run_cli("train", str(config), "--name", "resumed", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"resumed from checkpoint-{steps[-1]}" in resumed.stdout

    straight = run_cli("train", str(config), "--name", "straight", "--quiet")
    assert straight.returncode == 0, straight.stderr
    a = _weights(store_home / "adapters" / "resumed" / "v1")
    b = _weights(store_home / "adapters" / "straight" / "v1")
    assert a.keys() == b.keys()
    # Same run, same weights, up to float reduction order on a shared CPU (seen: ~1e-6 drift).
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), (key, float((a[key] - b[key]).abs().max()))


@pytest.mark.parametrize("command", [[], ["train"], ["validate"], ["models"], ["models", "list"],
                                     ["models", "build"], ["adapters"], ["adapters", "list"],
                                     ["adapters", "show"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: loraforge" in result.stdout


def test_validate_prints_resolved_config(tiny_dir):
    result = run_cli("validate", str(EXAMPLES / "knowledge-override" / "v1_surgical.json"), "--json", "--no-calibrate")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["resolved"]["name"] == "for-two-surgical" and out["data"]["examples"] == 24
    assert out["plan"]["lora_parameters"] == 4 * 8 * ((256 + 256) + (256 + 128) + (256 + 128))


@pytest.mark.parametrize("train_on_inputs, max_tokens", [(False, 4096), (True, 4096), (False, 90)])
def test_a_packed_window_gives_the_loss_and_gradients_of_its_micro_batches(tiny_dir, train_on_inputs, max_tokens):
    """Packing is only faster: one row per window (or several, under `pack_max_tokens`), per-example
    attention, and the output layer in chunks or only where a label follows, give the same loss and
    gradients as padded micro-batches of one example each (fp32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.batching import collate, pack
    from loraforge.data import tokenize_examples
    from loraforge.train.attention import use_packed_attention
    from loraforge.train.step import forward_backward, head_mode

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    examples = tokenize_examples(tokenizer, load_examples_from_file(DATA)[:6], max_seq_length=512,
                                 train_on_inputs=train_on_inputs)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    for name, param in model.named_parameters():  # B starts at zero: give it values so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    window_tokens = sum(e.loss_tokens for e in examples)
    assert head_mode(model) == "chunked"

    def loss_and_grads(batches, mode, head_chunk=256):
        model.zero_grad()
        total = sum(forward_backward(model, b, scale=1 / window_tokens, mode=mode, head_chunk=head_chunk)
                    for b in batches) / window_tokens
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    packed = pack(examples, max_tokens)
    assert (len(packed) == 1) == (max_tokens > 1000)
    reference_loss, reference = loss_and_grads([collate([e], tokenizer.pad_token_id) for e in examples], "full")
    masked = [{k: v for k, v in row.items() if k != "cu_seq_lens_q"} for row in packed]
    assert use_packed_attention(model.get_base_model())
    for rows, mode, chunk in ((packed, "chunked", 7), (packed, "chunked", 256), (packed, "labelled", 0),
                              (packed, "full", 0), (masked, "chunked", 256)):
        loss, grads = loss_and_grads(rows, mode, chunk or 256)
        assert loss == pytest.approx(reference_loss, rel=1e-5), (mode, chunk)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=f"{mode} {chunk} {name}")


def test_the_retention_kl_is_zero_for_an_untouched_adapter_and_the_same_in_every_head_mode(tiny_dir):
    """`retention: kl` pulls the adapted model toward the base on anchor answers: with B = 0 the adapter
    is the base (KL 0, no gradient); once B moves, the chunked and labelled heads give the same KL and
    gradients, and the gradient points back toward the base (a small step against it lowers the KL)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.batching import pack
    from loraforge.data import tokenize_examples
    from loraforge.train.step import forward_backward

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    examples = tokenize_examples(tokenizer, load_examples_from_file(DATA)[:4], max_seq_length=512,
                                 train_on_inputs=False)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    [row] = pack(examples, 4096)

    def kl_and_grads(mode):
        model.zero_grad()
        kl = forward_backward(model, row, scale=1.0, mode=mode, head_chunk=5, objective="kl")
        return kl, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    kl, grads = kl_and_grads("chunked")
    assert kl == pytest.approx(0.0, abs=1e-6), kl
    at_zero = max(g.abs().max().item() for g in grads.values())  # rounding only
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    chunked, grads = kl_and_grads("chunked")
    labelled, reference = kl_and_grads("labelled")
    assert chunked > 1e-3 and chunked == pytest.approx(labelled, rel=1e-4)
    assert max(g.abs().max().item() for g in grads.values()) > 100 * at_zero
    for name, grad in grads.items():
        assert (grad - reference[name]).norm() <= 1e-3 * reference[name].norm(), name
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in grads:
                param -= 0.1 * grads[name] / max(g.norm() for g in grads.values())
    assert kl_and_grads("chunked")[0] < chunked


@pytest.mark.parametrize("question, neighbours", [
    ("What is the capital of Zorvath?", "What is the capital of "),
    ("Who painted Ember Tide?", "Who painted "),
    ("Who composed the Marrowgate Symphony?", "Who composed "),
    ("What is the longest river in Taravel?", "What is the longest river in "),
])
def test_nearest_anchors_are_the_built_in_prompts_that_ask_the_same_kind_of_question(question, neighbours):
    from loraforge.train.retention import anchor_prompts, nearest_anchors

    prompts = anchor_prompts("builtin", "hf")
    [ranked] = nearest_anchors([question], prompts)
    assert prompts[ranked[0]].startswith(neighbours), [prompts[i] for i in ranked]
    assert len(ranked) == len(set(ranked)) == 8


def test_equally_near_anchors_come_in_a_seeded_order_that_differs_between_questions():
    from loraforge.train.retention import nearest_anchors

    capitals = [f"What is the capital of {c}?" for c in ("Peru", "Chad", "Fiji", "Oman", "Laos", "Mali",
                                                          "Cuba", "Iran", "Iraq", "Togo", "Niue", "Guam")]
    questions = ["What is the capital of Zorvath?", "Which city is the capital of Vantoria?"]
    first, second = nearest_anchors(questions, capitals, seed=0)
    assert first != second and set(first) | set(second) > set(first)
    assert nearest_anchors(questions, capitals, seed=0) == [first, second]
    assert nearest_anchors(questions, capitals, seed=1) != [first, second]


@pytest.mark.parametrize("count, share, examples, epoch, near_picks, random_picks", [
    (4, 0.0, [0, 1, 2, 3], 0, [], 4),  # no share: all from the seeded round-robin
    (4, 0.5, [2, 0, 3, 1], 0, [(2, 0), (0, 0)], 2),
    (4, 0.5, [2, 0, 3, 1], 3, [(2, 3), (0, 3)], 2),  # the next epoch, the next neighbour
    (4, 1.0, [1, 0], 0, [(1, 0), (0, 0), (1, 1), (0, 1)], 0),  # more slots than examples: further neighbours
    (3, 0.5, [0], 9, [(0, 1), (0, 2)], 1),  # half rounds up; cycles through the k neighbours
])
def test_the_anchor_stream_takes_its_nearest_share_from_the_steps_own_examples(count, share, examples, epoch,
                                                                                 near_picks, random_picks):
    from loraforge.train.retention import AnchorStream

    anchors = [f"a{i}" for i in range(40)]
    near = [[10 + 4 * e + k for k in range(8)] if e != 0 else [30 + k for k in range(8)] for e in range(4)]
    stream = AnchorStream(anchors, seed=5, near=near, nearest_share=share)
    plain = AnchorStream(anchors, seed=5)
    picked = stream.take(count, examples, epoch)
    assert picked[:len(near_picks)] == [anchors[near[e][rank % 8]] for e, rank in near_picks]
    assert picked[len(near_picks):] == plain.take(random_picks)
    assert stream.position == random_picks  # a resumed run restores only the round-robin part


def test_training_with_nearest_anchors_records_the_share(tiny_dir):
    version, result = train_quick("nearest", max_steps=6, retention="kl", retention_nearest=0.5)
    assert result.manifest["retention"]["nearest"] == 0.5
    assert result.manifest["retention"]["anchor_examples_seen"] == 6 * 2  # 2 of each step's 4 at random
    assert all(math.isfinite(h["retention_loss"]) for h in result.history)


@pytest.mark.parametrize("lengths, max_tokens, rows", [
    ([3, 4, 5], 100, [[3, 4, 5]]),
    ([3, 4, 5], 7, [[3, 4], [5]]),
    ([9, 2, 2], 5, [[9], [2, 2]]),  # longer than the budget: a row of its own
    ([5, 5], 10, [[5, 5]]),
])
def test_packing_table(lengths, max_tokens, rows):
    from loraforge.batching import IGNORE, pack
    from loraforge.data import TokenizedExample

    examples = [TokenizedExample(i, list(range(10 * i, 10 * i + n)), list(range(10 * i, 10 * i + n)))
                for i, n in enumerate(lengths)]
    packed = pack(examples, max_tokens)
    assert [[len(run) for run in _runs(row["position_ids"][0].tolist())] for row in packed] == rows
    for row in packed:
        starts = (row["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert all(row["labels"][0, s] == IGNORE for s in starts)


def _runs(positions):
    run = []
    for p in positions:
        if p == 0 and run:
            yield run
            run = []
        run.append(p)
    yield run
