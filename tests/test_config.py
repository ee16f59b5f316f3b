"""Config parsing: every seed dialect, the flat form, overlaps, and a table of bad configs."""

import json
import math

import pytest
import yaml

from conftest import EXAMPLES, SEEDS
from loraforge.config import load_config_file, parse_train_config
from loraforge.errors import ConfigError, LoraforgeError
from loraforge.train.plan import plan_training


def seed(name):
    return load_config_file(SEEDS / name)


# (seed file, adapter name, epochs, max_steps, batch, grad accum, lr, note that must appear)
SEED_CASES = [
    ("v1_surgical.json", "tron_collaborative_intelligence_v1", 25, -1, 1, 4, 1e-4, "eval_steps=250 is recorded"),
    ("v2_override.json", "v2_override", 50, -1, 1, 8, 2e-4, "taken from the config file name"),
    ("intensive_7_6.json", "intensive_7_6", 50, 2500, 1, 1, 5e-5, "max_steps=2500 applies"),
]


@pytest.mark.parametrize("file, name, epochs, max_steps, batch, accum, lr, note", SEED_CASES)
def test_seed_configs_resolve_as_documented(file, name, epochs, max_steps, batch, accum, lr, note):
    spec = parse_train_config(seed(file), source=file)
    assert spec.name == name
    t = spec.training
    assert (t.num_epochs, t.max_steps, t.batch_size, t.gradient_accumulation_steps, t.learning_rate) == (
        epochs, max_steps, batch, accum, lr)
    assert any(note in n for n in spec.notes), spec.notes
    raw = seed(file)
    assert spec.lora.r == raw["lora_config"]["r"]
    assert spec.lora.target_modules == raw["lora_config"]["target_modules"]


def test_seed_v1_plans_offline_against_codellama():
    plan = plan_training(parse_train_config(seed("v1_surgical.json"), source="v1_surgical.json"))
    assert plan.model.id == "codellama/CodeLlama-7b-Instruct-hf"
    # r·(in+out) for q, k, v (4096×4096 each) over 32 layers
    assert plan.lora_parameters == 8 * (4096 + 4096) * 3 * 32
    assert plan.theoretical_min_bytes == plan.lora_parameters * 4


def test_seed_sweep_space_is_named_as_a_tuning_space():
    with pytest.raises(ConfigError, match="tuning search space"):
        parse_train_config(seed("sweep_space_004.json"), source="sweep_space_004.json")


def test_flat_yaml_equals_nested_json(tmp_path):
    nested = seed("v1_surgical.json")
    flat = {"model_name": nested["model_name"], "output_dir": nested["output_dir"],
            "description": nested["description"],
            **nested["lora_config"], **nested["training_config"]}
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump(flat))
    a = parse_train_config(nested, source="v1.json")
    b = parse_train_config(load_config_file(path), source="flat.yaml")
    assert a.resolved() == b.resolved()


def test_hf_names_equal_seed_names():
    a = parse_train_config({"name": "x", "training_config": {"num_epochs": 3, "batch_size": 2}})
    b = parse_train_config({"name": "x", "training_config": {"num_train_epochs": 3, "per_device_train_batch_size": 2}})
    assert a.resolved() == b.resolved()


def test_same_value_twice_is_noted():
    spec = parse_train_config({"name": "x", "r": 8, "lora_config": {"r": 8}})
    assert any("same value" in n for n in spec.notes)


def test_warmup_steps_beat_ratio_and_say_so():
    spec = parse_train_config({"name": "x", "warmup_steps": 10, "warmup_ratio": 0.1})
    assert any("warmup_steps=10 applies" in n for n in spec.notes)


def test_comment_keys_are_ignored():
    assert parse_train_config({"name": "x", "_comment": "hi"}).name == "x"


BAD_CONFIGS = [
    ({"name": "x", "lora_config": {"rank": 8}}, "lora_config.rank", "did you mean 'r'"),
    ({"name": "x", "learnig_rate": 1e-4}, "learnig_rate", "did you mean 'learning_rate'"),
    ({"name": "x", "training_config": {"num_epoch": 3}}, "training_config.num_epoch", "did you mean 'num_epochs'"),
    ({"name": "x", "lora_config": {"r": 0}}, "lora_config.r", "greater than or equal to 1"),
    ({"name": "x", "lora_config": {"lora_dropout": 1.0}}, "lora_config.lora_dropout", "less than 1"),
    ({"name": "x", "lora_config": {"lora_dropout": -0.1}}, "lora_config.lora_dropout", "greater than or equal"),
    ({"name": "x", "learning_rate": 0}, "learning_rate", "greater than 0"),
    ({"name": "x", "learning_rate": math.inf}, "learning_rate", "finite"),
    ({"name": "x", "learning_rate": math.nan}, "learning_rate", "finite"),
    ({"name": "x", "learning_rate": "fast"}, "learning_rate", "valid number"),
    ({"name": "x", "num_epochs": 3, "num_train_epochs": 5}, "num_train_epochs", "conflicts with num_epochs"),
    ({"name": "x", "r": 8, "lora_config": {"r": 16}}, "lora_config.r", "conflicts with r"),
    ({"output_dir": "../../etc/x"}, "output_dir", "escapes the adapter store"),
    ({"output_dir": "/tmp/x"}, "output_dir", "escapes the adapter store"),
    ({"output_dir": "./models/x"}, "output_dir", "escapes the adapter store"),
    ({"output_dir": "./adapters//x"}, "output_dir", "escapes the adapter store"),
    ({"output_dir": "./adapters/Bad Name"}, "output_dir", "invalid output_dir"),
    ({"name": "x", "output_dir": "./adapters/y"}, "name", "disagree"),
    ({"name": "x", "lora_config": {"task_type": "SEQ_CLS"}}, "lora_config.task_type", "CAUSAL_LM"),
    ({"name": "x", "lora_config": {"target_modules": []}}, "lora_config.target_modules", "at least 1"),
    ({"name": "x", "lora_config": "r=8"}, "lora_config", "must be a mapping"),
    ({"name": "x", "bf16": "yes"}, "bf16", "true or false"),
    ({"name": "x", "training_config": {"retention_nearest": 1.5}}, "training_config.retention_nearest",
     "less than or equal to 1"),
    ({"name": "x", "retention_nearest": -0.5}, "retention_nearest", "greater than or equal to 0"),
    ({"name": "x", "scope": "nearby"}, "scope", "'all' or 'near'"),
    ({"name": "x", "training_config": {"scope_threshold": 0}}, "training_config.scope_threshold", "greater than 0"),
    ({"name": "x", "scope_threshold": 1.5}, "scope_threshold", "less than or equal to 1"),
]


@pytest.mark.parametrize("raw, field, message", BAD_CONFIGS)
def test_bad_configs_name_the_field(raw, field, message):
    with pytest.raises(LoraforgeError) as info:
        parse_train_config(raw, source="cfg.json")
    assert info.value.field == field
    assert message in info.value.message, info.value.message


MODEL_BAD = [
    ({"name": "x", "model_name": "tinyllama-1.1b-chat", "target_modules": ["q_proj", "qkv"]},
     "target_modules", "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ({"name": "x", "model_name": "tinyllama-1.1b-chat", "max_seq_length": 4096}, "max_seq_length", "2048 tokens"),
    ({"name": "x", "model_name": "no-such-model"}, "model_name", "unknown model"),
]


@pytest.mark.parametrize("raw, field, message", MODEL_BAD)
def test_model_checks_name_the_field(raw, field, message):
    with pytest.raises(Exception) as info:
        plan_training(parse_train_config(raw))
    assert info.value.field == field
    assert message in info.value.message, info.value.message


def test_invalid_json_file_names_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"name": "x",\n "r": }')
    with pytest.raises(ConfigError, match=r"c.json: invalid JSON at line 2"):
        load_config_file(path)


def test_config_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(path)


SHIPPED = sorted(p for folder in ("knowledge-override", "continuous") for p in (EXAMPLES / folder).glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_parses_and_finds_its_data_and_suite(path):
    from argparse import Namespace

    from loraforge.cli import _load_spec
    from loraforge.evals.suite import parse_suite

    spec, examples, _ = _load_spec(Namespace(config=str(path)))  # as `loraforge train` reads it
    assert examples
    if spec.eval_suite is not None:
        assert any(c.kind == "target" for c in parse_suite(spec.eval_suite, source=path.name).cases)
    if spec.eval_suite is not None and spec.training.eval_steps is not None:  # "scored once at the end": the last step
        steps = math.ceil(len(examples) / spec.training.batch_size) * spec.training.num_epochs
        assert spec.training.eval_steps == steps / spec.training.gradient_accumulation_steps
