"""Tuning logic without training: the spec (ours and the seed's sweep space), the grid, budgets, rows, Pareto, predictor."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import SEEDS
from loraforge.errors import ConfigError, LoraforgeError
from loraforge.tune.results import SEED_FIELDS, best_rows, trial_row
from loraforge.tune.space import grid, training_settings
from loraforge.tune.spec import Range, parse_tune_spec
from loraforge.tune.study import budget_of

BASE = {"name": "t", "domains": ["marketing"], "space": {"r": [4, 8]}, "strategy": "grid"}


def spec(**changes):
    return parse_tune_spec({**BASE, **changes})


def test_the_seed_sweep_space_is_accepted_verbatim():
    raw = json.loads((SEEDS / "sweep_space_004.json").read_text())
    s = parse_tune_spec(raw, source="sweep_space_004.json")
    assert s.name == "sweep-space-004"
    assert len(s.domains) == 12 and "real-estate" in s.domains and "customer-support" in s.domains
    assert s.space.r == [4, 8, 16, 32, 64] and s.space.alpha_ratio == [2.0] and s.space.lora_alpha is None
    assert s.epochs == 3 and s.train_size == 100
    assert s.fixed == {"lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    points = grid(s)
    assert len(points) == 5 * 6 * 3 * 1  # rank x weight decay x learning rate x alpha ratio
    settings = training_settings(s, points[0])
    assert settings["lora_alpha"] == 2 * settings["r"] and settings["lora_dropout"] == 0.1
    assert settings["target_modules"] == ["q_proj", "v_proj"] and settings["num_epochs"] == 3


@pytest.mark.parametrize("changes, message", [
    ({"domains": ["astrology"]}, "unknown domain 'astrology'"),
    ({"domains": [], "dataset": None}, "give domains"),
    ({"dataset": "d.jsonl", "domains": []}, "needs a suite"),
    ({"space": {"learning_rate": {"low": 1e-2, "high": 1e-4}}}, "space.learning_rate"),
    ({"space": {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}}, "log range needs low > 0"),
    ({"space": {"r": [4], "lora_alpha": [8], "alpha_ratio": [2]}}, "not both"),
    ({"space": {"r": [4.5]}}, "whole numbers"),
    ({"space": {}}, "searches nothing"),
    ({"space": {"r": [4, 8], "rank": [2]}}, "same thing"),
    ({"space": {"r": [4], "alpha": "rank ** 2"}}, "rank * K"),
    ({"strategy": "bayes"}, "strategy"),
    ({"objectives": ["size"]}, "include accuracy"),
    ({"objectives": ["accuracy", "size"], "strategy": "tpe+hyperband"}, "one objective"),
    ({"fixed": {"r": 8}}, "also searched"),
    ({"fixed": {"num_epochs": 8}}, "fixed.num_epochs"),
    ({"epochs": 0}, "epochs"),
    ({"workers": 0}, "workers"),
    ({"name": "Bad Name"}, "name"),
    ({"trials": 5, "surprise": 1}, "surprise"),
])
def test_bad_specs_name_the_field(changes, message):
    with pytest.raises(LoraforgeError, match=message.replace("*", r"\*").replace("(", r"\(")):
        spec(**changes)


@pytest.mark.parametrize("rng, points", [
    (Range(low=1e-4, high=1e-2, log=True), [1e-4, 1e-3, 1e-2]),
    (Range(low=0.0, high=0.1, points=3), [0.0, 0.05, 0.1]),
    (Range(low=1e-4, high=1e-2, log=True, grid=[3e-4, 3e-3]), [3e-4, 3e-3]),
])
def test_grid_points_of_a_range(rng, points):
    assert rng.grid_points() == pytest.approx(points)


def test_grid_is_the_product_and_names_module_sets():
    s = spec(space={"r": [4, 8], "target_modules": [["q_proj", "v_proj"], "all-linear"],
                    "learning_rate": {"low": 1e-4, "high": 1e-3, "log": True, "points": 2}})
    points = grid(s)
    assert len(points) == 2 * 2 * 2
    assert {p["target_modules"] for p in points} == {"q_proj+v_proj", "all-linear"}
    settings = training_settings(s, {"r": 8, "learning_rate": 1e-3, "target_modules": "all-linear"})
    assert len(settings["target_modules"]) == 7 and settings["lora_alpha"] == 16.0


@pytest.mark.parametrize("changes, budget", [
    ({"strategy": "grid"}, 2), ({"strategy": "grid", "trials": 1}, 1), ({"strategy": "tpe", "trials": 7}, 7),
    ({"strategy": "predict", "predict": {"samples": 4, "verify": 2}}, 6),
])
def test_budget(changes, budget):
    assert budget_of(spec(**changes)) == budget


def test_a_sampling_strategy_needs_a_budget():
    with pytest.raises(ConfigError, match="needs a budget"):
        budget_of(spec(strategy="random"))


def _row(trial, accuracy, size, seconds, state="complete"):
    return {"trial": trial, "accuracy": accuracy, "adapter_bytes": size, "training_time_seconds": seconds,
            "state": state}


def test_best_single_objective_breaks_ties_by_training_time():
    rows = [_row(0, 0.5, 10, 3.0), _row(1, 0.9, 10, 5.0), _row(2, 0.9, 10, 4.0), _row(3, 1.0, 1, 1.0, "pruned")]
    assert [r["trial"] for r in best_rows(rows, spec())] == [2]


def test_pareto_front_for_accuracy_and_size():
    rows = [_row(0, 0.9, 100, 1), _row(1, 0.8, 50, 1), _row(2, 0.7, 80, 1), _row(3, 0.9, 120, 1)]
    s = spec(objectives=["accuracy", "size"])
    assert [r["trial"] for r in best_rows(rows, s)] == [0, 1]


def test_rows_have_the_seed_fields_in_the_seed_order():
    s = spec(price_per_hour=3.6)
    outcome = SimpleNamespace(config={"r": 8, "lora_alpha": 16.0, "weight_decay": 0.01, "learning_rate": 1e-3},
                              accuracy=0.75, training_seconds=6.0, epochs_run=3, device="cpu", test_accuracy=0.5,
                              best_epoch=2, epoch_accuracy=[0.5, 0.75, 0.7], adapter_bytes=1000)
    ref = SimpleNamespace(name="t-marketing", data="marketing")
    row = trial_row(s, ref, 4, {"r": 8}, outcome, state="complete", device_seconds=10.0, worker="h:1")
    assert list(row)[:len(SEED_FIELDS)] == list(SEED_FIELDS)
    assert (row["rank"], row["alpha"], row["latency"], row["cost"]) == (8, 16.0, 2.0, 0.01)
    assert (row["trial"], row["state"], row["seed"], row["params"]) == (4, "complete", 0, {"r": 8})


def test_predictor_ranks_untested_points_and_measures_its_error():
    from loraforge.tune.predict import rank_grid

    s = spec(strategy="predict", space={"r": [2, 4, 8, 16, 32], "learning_rate": [1e-4, 1e-3, 1e-2]},
             predict={"samples": 6, "verify": 2})
    points = grid(s)
    truth = {(p["r"], p["learning_rate"]): (p["r"] / 32) * (1.0 if p["learning_rate"] == 1e-3 else 0.5) for p in points}
    tested = [(p, truth[(p["r"], p["learning_rate"])]) for p in points if p["r"] in (2, 8, 32)]
    ranked, mae = rank_grid(s, tested, points)
    assert len(ranked) == len(points) - len(tested)
    assert ranked[0][0]["learning_rate"] == 1e-3 and ranked[0][0]["r"] == 16  # the best untested point
    assert 0 <= mae < 0.3
