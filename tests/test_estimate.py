"""The memory estimate: its terms on a table of cases, its activation term against what autograd really
saves, and the refusal of a run that cannot fit (CLI and HTTP), with `force` to start anyway."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EXAMPLES, run_cli
from loraforge.train import estimate as est

# a small Llama-shaped model: 2 layers, 64 wide, MLP 128, 4 heads of 16 (2 for key/value), vocabulary 100
ARCH = est.Arch(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=100,
                parameters=50_000, embedding_parameters=6_400, context=512)
QV = {"q_proj": [(64, 64)] * 2, "v_proj": [(64, 32)] * 2}
ALL = {**QV, "k_proj": [(64, 32)] * 2, "o_proj": [(64, 64)] * 2, "gate_proj": [(64, 128)] * 2,
       "up_proj": [(64, 128)] * 2, "down_proj": [(128, 64)] * 2}


def settings(**changes) -> est.Settings:
    base = dict(device="cpu", precision="fp32", quantization=None, targets=QV, r=4, dropout=0.0,
                modules_to_save_parameters=0, lora_parameters=1_000, packing=True, pack_max_tokens=512, batch_size=1,
                gradient_accumulation_steps=1, gradient_checkpointing=False, retention="none", max_seq_length=100)
    return est.Settings(**{**base, **changes})


# per token, one layer, fp32: norms 2·64·4+8, attention (2·64+2·32)·4+4·4, MLP 3·128·4
FIXED_FP32 = 2 * 64 * 4 + 8 + (2 * 64 + 2 * 32) * 4 + 16 + 3 * 128 * 4
FIXED_BF16 = 2 * 64 * 4 + 8 + (2 * 64 + 2 * 32) * 4 + 16 + 3 * 128 * 2


@pytest.mark.parametrize("changes, per_layer_token", [
    ({}, FIXED_FP32 + 64 * 4 + 2 * 4 * 4),  # fp32: q and v share one saved input
    ({"precision": "bf16"}, FIXED_BF16 + 2 * 64 * 4 + 2 * 4 * 4),  # half base: an fp32 copy per module
    ({"dropout": 0.1}, FIXED_FP32 + 2 * 64 * 8 + 2 * 4 * 4),  # dropout: output + fp32 noise per module
    ({"targets": ALL}, FIXED_FP32 + (64 + 64 + 128) * 4 + 7 * 4 * 4),  # o reads attention's saved output
    ({"targets": ALL, "precision": "bf16"}, FIXED_BF16 + (6 * 64 + 128) * 4 + 7 * 4 * 4),
])
def test_activation_terms_per_layer_and_token(changes, per_layer_token):
    assert est._layer_bytes(ARCH, settings(**changes)) == per_layer_token


@pytest.mark.parametrize("changes, rows_tokens", [
    ({}, (1, 100)),  # no data: examples of max_seq_length
    ({"longest_example": 40}, (1, 40)),
    ({"longest_example": 40, "batch_size": 4}, (1, 160)),  # a packed window of 4
    ({"longest_example": 40, "batch_size": 4, "gradient_accumulation_steps": 8}, (1, 480)),  # 12 fit in 512
    ({"longest_example": 40, "batch_size": 4, "pack_max_tokens": 100}, (1, 80)),
    ({"longest_example": 300, "pack_max_tokens": 100, "max_seq_length": 400}, (1, 300)),  # its own row
    ({"longest_example": 40, "batch_size": 4, "packing": False}, (4, 40)),  # padded micro-batch
])
def test_largest_forward(changes, rows_tokens):
    assert est.forward_shape(settings(**changes)) == rows_tokens


def test_training_terms_add_up_and_follow_the_settings():
    plain = est.estimate_training(ARCH, settings())
    n, layer = 100, est._layer_bytes(ARCH, settings())
    assert plain.terms["frozen_weights"] == 50_000 * 4
    assert (plain.terms["lora_weights"], plain.terms["lora_gradients"], plain.terms["optimizer_state"]) == (
        4_000, 4_000, 8_000)
    assert plain.terms["activations"] == n * 2 * layer + n * 64 * (4 + 4 + 4)
    assert plain.terms["logits_and_loss"] == min(256, n) * 100 * (4 + 4 + 4 + 4)
    retained = plain.terms["allocator_retention"]
    assert retained == int(0.5 * (plain.terms["activations"] + plain.terms["logits_and_loss"]))
    assert plain.training_bytes == sum(plain.terms.values()) and plain.total == plain.training_bytes

    bf16 = est.estimate_training(ARCH, settings(precision="bf16"))
    assert bf16.terms["frozen_weights"] == 50_000 * 2
    ckpt = est.estimate_training(ARCH, settings(gradient_checkpointing=True))
    assert ckpt.terms["activations"] == n * (2 * 64 * 4 + layer) + n * 64 * 12 < plain.terms["activations"]
    kl = est.estimate_training(ARCH, settings(retention="kl"))
    assert kl.terms["logits_and_loss"] == 2 * plain.terms["logits_and_loss"]
    gpu = est.estimate_training(ARCH, settings(device="cuda", precision="bf16", quantization="4bit"))
    assert gpu.terms["frozen_weights"] == int((50_000 - 6_400) * est.NF4_BYTES + 6_400 * 2)
    assert "allocator_retention" not in gpu.terms
    saved = est.estimate_training(ARCH, settings(modules_to_save_parameters=6_400))
    assert saved.terms["modules_to_save"] == 6_400 * 16


@pytest.mark.parametrize("changes, forwards", [
    ({}, 1),
    ({"longest_example": 40, "batch_size": 4, "gradient_accumulation_steps": 8}, 3),  # 32 examples, 12 per forward
    ({"longest_example": 300, "batch_size": 4, "pack_max_tokens": 512, "max_seq_length": 400}, 4),  # one each
    ({"batch_size": 4, "gradient_accumulation_steps": 2, "packing": False}, 2),  # a padded micro-batch each
])
def test_forwards_per_step(changes, forwards):
    assert est.forwards_per_step(settings(**changes)) == forwards


LIVE_FP32 = 100 * 2 * est._layer_bytes(ARCH, settings()) + 100 * 64 * 12 + 100 * 100 * 16  # activations + head


@pytest.mark.parametrize("changes, retained", [
    ({}, int(0.5 * LIVE_FP32)),  # one forward per step: half the live activations and logits again
    ({"batch_size": 2, "pack_max_tokens": 100}, int(0.75 * LIVE_FP32)),  # two forwards: 1.5 + 0.5 x (1 - 1/2)
    ({"gradient_checkpointing": True}, 20 * 1024 * 100 * 2),  # recomputed blocks under the mmap threshold
    ({"gradient_checkpointing": True, "precision": "bf16"}, 10 * 1024 * 100 * 2),  # half-size blocks
    ({"gradient_checkpointing": True, "max_seq_length": 5000}, None),  # 5000 x 64 x 4 bytes: returned by mmap
    # the longest example (4,100 tokens) is over the threshold, most (4,000, the mean) under it: kept
    ({"gradient_checkpointing": True, "max_seq_length": 5000, "pack_max_tokens": 5000, "longest_example": 4100,
      "mean_example": 4000}, 20 * 1024 * 4100 * 2),
    ({"gradient_checkpointing": True, "device": "cuda"}, None),  # CUDA's caching allocator: not this term
    ({"device": "cuda"}, None),
])
def test_cpu_allocator_retention(changes, retained):
    terms = est.estimate_training(ARCH, settings(**changes)).terms
    assert terms.get("allocator_retention") == retained


@pytest.mark.parametrize("file_bytes, precision, loading", [
    (4, "fp32", 200_000),  # same dtype: the weights are the mapped file's pages
    (4, "bf16", 200_000 + 100_000),  # converted: file pages and the bf16 copy together
    (2, "bf16", 100_000),
])
def test_loading_peak(file_bytes, precision, loading):
    e = est.estimate_training(ARCH, settings(precision=precision, checkpoint_bytes=50_000 * file_bytes,
                                             checkpoint_value_bytes=file_bytes))
    assert e.loading_bytes == loading + est.CPU_OVERHEAD


@pytest.mark.parametrize("text, value", [("12GiB", 12 * 2**30), ("800 MB", 800 * 10**6), ("2e9", 2 * 10**9),
                                         ("64mib", 64 * 2**20), ("1024", 1024)])
def test_memory_limit_sizes(text, value):
    assert est.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5GB"])
def test_memory_limit_rejects_nonsense(text):
    with pytest.raises(Exception, match="LORAFORGE_MEMORY_LIMIT"):
        est.parse_bytes(text)


@pytest.mark.parametrize("precision, dropout, targets", [
    ("float32", 0.0, ["q_proj", "v_proj"]), ("float32", 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("float32", 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("bfloat16", 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("bfloat16", 0.05, ["q_proj", "v_proj", "down_proj"]),
])
def test_activation_term_equals_what_autograd_saves(tiny_dir, precision, dropout, targets):
    """The per-layer term against the tensors autograd really keeps for the backward of one packed row of
    the built-in model (counted by storage, shapes only: the same on any build and any CPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.train.attention import use_packed_attention
    from loraforge.train.step import forward_backward, head_mode

    tokens = 96
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=getattr(torch, precision))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))
    model.train()
    use_packed_attention(model.get_base_model())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, tuple]] = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, (t.untyped_storage().nbytes(), tuple(t.shape)))
        return t

    ids = torch.randint(3, 1000, (1, tokens))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(tokens)[None],
             "cu_seq_lens_q": torch.tensor([0, tokens], dtype=torch.int32)}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        forward_backward(model, batch, scale=1.0, mode=head_mode(model))
    config = AutoConfig.from_pretrained(tiny_dir)
    decoder = sum(nbytes for nbytes, shape in saved.values() if not shape or shape[-1] != config.vocab_size)
    arch = est.Arch.from_config(config, 0)
    shapes = {m: [(m_in, m_out)] * arch.layers for m, (m_in, m_out) in {
        "q_proj": (arch.hidden, arch.heads * arch.head_dim), "k_proj": (arch.hidden, arch.kv_heads * arch.head_dim),
        "v_proj": (arch.hidden, arch.kv_heads * arch.head_dim), "o_proj": (arch.heads * arch.head_dim, arch.hidden),
        "gate_proj": (arch.hidden, arch.intermediate), "up_proj": (arch.hidden, arch.intermediate),
        "down_proj": (arch.intermediate, arch.hidden)}.items() if m in targets}
    s = settings(precision="fp32" if precision == "float32" else "bf16", targets=shapes, r=8, dropout=dropout)
    predicted = tokens * arch.layers * est._layer_bytes(arch, s)
    final_norm = tokens * arch.hidden * 4
    # the first layer saves a little less (its input needs no gradient): ~4% of a 4-layer model, ~0.5% of 30
    assert abs(decoder - final_norm - predicted) <= 0.06 * predicted, (decoder, final_norm, predicted)


def _big_config(tmp_path, **extra):
    config = json.loads((EXAMPLES / "knowledge-override" / "v1_surgical.json").read_text())
    config.setdefault("training_config", {}).update({"max_steps": 1, "batch_size": 4})
    config.update(extra, training_data=str(EXAMPLES / "knowledge-override" / "42_for_two.jsonl"))
    path = tmp_path / "big.json"
    path.write_text(json.dumps(config))
    return path


def test_validate_reports_memory_time_and_serving(tiny_dir, tmp_path):
    result = run_cli("validate", str(_big_config(tmp_path)), "--json", "--no-calibrate")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    memory = out["memory"]
    assert memory["fits"] is True and memory["peak_bytes"] == max(memory["training_bytes"], memory["loading_bytes"])
    assert memory["training_bytes"] == sum(memory["terms"].values())
    assert {"frozen_weights", "lora_weights", "optimizer_state", "activations", "logits_and_loss"} <= set(memory["terms"])
    assert out["serving"]["terms"]["kv_cache_per_sequence"] > 0
    assert out["time"]["planned_tokens"] > 0 and out["time"]["seconds"] is None  # nothing calibrated here
    human = run_cli("validate", str(_big_config(tmp_path)), "--no-calibrate")
    assert human.returncode == 0 and "peak memory" in human.stdout and "activations" in human.stdout


def test_a_run_that_cannot_fit_is_refused_with_the_fixes_named(tiny_dir, tmp_path):
    limit = {"LORAFORGE_MEMORY_LIMIT": "4MiB"}
    result = run_cli("train", str(_big_config(tmp_path)), "--quiet", env=limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "exceeds the 4 MiB" in result.stderr and "gradient_checkpointing: true ->" in result.stderr
    assert "--force" in result.stderr
    validate = json.loads(run_cli("validate", str(_big_config(tmp_path)), "--json", "--no-calibrate", env=limit).stdout)
    assert validate["memory"]["fits"] is False
    fixes = {f["change"]: f["peak_bytes"] for f in validate["memory"]["fixes"]}
    assert fixes["gradient_checkpointing: true"] < validate["memory"]["peak_bytes"]
    forced = run_cli("train", str(_big_config(tmp_path)), "--quiet", "--force", env=limit)
    assert forced.returncode == 0, forced.stderr


def test_the_server_refuses_a_job_that_cannot_fit_unless_forced(tmp_path, tiny_dir, store_home):
    from server import ServerProcess
    from test_server import fast_config

    srv = ServerProcess(store_home, env={"LORAFORGE_MEMORY_LIMIT": "4MiB"})
    try:
        with srv.client() as c:
            r = c.post("/api/training/start", json=fast_config("big", max_steps=1))
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["code"] == "insufficient_memory" and "exceeds the 4 MiB" in error["message"]
            assert "gradient_checkpointing: true ->" in error["message"] and "force: true" in error["message"]
            assert c.get("/api/training/jobs").json()["jobs"] == []  # nothing was queued
            r = c.post("/api/training/start", json={**fast_config("big", max_steps=1), "force": True})
            assert r.status_code == 202, r.text
    finally:
        srv.stop()


@pytest.mark.parametrize("content, seconds", [
    ('{"KEY": {"seconds_per_token": 0.5, "first_step_extra_s": 2}}', lambda tokens: tokens * 0.5 + 2),  # a sound entry is used
    ('{"KEY": {"seconds_per_token": "fast"}}', None), ('[1, 2]', None), ('not json', None),
    ('{"KEY": {"seconds_per_token": -1, "first_step_extra_s": 0}}', None)])
def test_time_comes_from_a_sound_calibration_entry_only(tiny_dir, store_home, content, seconds):
    from loraforge.config import parse_train_config
    from loraforge.data import load_examples
    from loraforge.train import calibrate
    from loraforge.train.plan import plan_training

    plan = plan_training(parse_train_config({"name": "c", "model_name": "tiny", "max_steps": 3}, source="t"))
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    data = est.tokenized(plan, load_examples(records, "t"))
    key = calibrate.cache_key(plan, est.for_plan(plan, data=data)[0].forward_tokens)
    path = calibrate._cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("KEY", key.replace('"', '\\"')))
    timing = calibrate.estimate_time(plan, [], data)
    tokens = timing["planned_tokens"]
    assert tokens == 3 * len(data[0].input_ids)  # max_steps 3, one example per step
    if seconds is None:
        assert timing["seconds"] is None and timing["calibrated"] is None
    else:
        assert timing["seconds"] == round(seconds(tokens), 1) and timing["calibrated"] == "cached"


def test_fast_steps_are_calibrated_over_more_steps(tiny_dir, store_home):
    """Four steps of a few hundredths of a second time the scheduler, not the model: calibration runs longer."""
    from loraforge.config import parse_train_config
    from loraforge.data import load_examples
    from loraforge.train import calibrate
    from loraforge.train.plan import plan_training

    plan = plan_training(parse_train_config({"name": "c", "model_name": "tiny", "max_steps": 3}, source="t"))
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    examples = load_examples(records, "t")
    entry = calibrate.calibrate(plan, examples, est.for_plan(plan, data=est.tokenized(plan, examples))[0].forward_tokens)
    steps = int(entry["source"].split("(")[1].split()[0])
    assert calibrate.CALIBRATION_STEPS < steps <= calibrate.MAX_CALIBRATION_STEPS
    assert entry["seconds_per_token"] > 0
