"""The search space in Optuna's terms: suggest a trial's parameters, enumerate the grid, build its config."""

from __future__ import annotations

import itertools
from typing import Any

from loraforge.tune.spec import Range, TuneSpec


def suggest(trial, spec: TuneSpec) -> dict[str, Any]:
    """Ask `trial` for every searched dimension (enqueued trials get their fixed values back)."""
    params: dict[str, Any] = {}
    for key, values in spec.space.dimensions().items():
        if isinstance(values, Range):
            params[key] = trial.suggest_float(key, values.low, values.high, log=values.log)
        else:
            params[key] = trial.suggest_categorical(key, list(values))
    return params


def grid(spec: TuneSpec) -> list[dict[str, Any]]:
    """Every grid point, in a fixed order."""
    dims = spec.space.dimensions()
    axes = [v.grid_points() if isinstance(v, Range) else list(v) for v in dims.values()]
    return [dict(zip(dims, point)) for point in itertools.product(*axes)]


def distributions(spec: TuneSpec) -> dict[str, Any]:
    """Optuna distributions for enqueuing grid points that `suggest` will then ask for."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out = {}
    for key, values in spec.space.dimensions().items():
        if isinstance(values, Range):
            out[key] = FloatDistribution(values.low, values.high, log=values.log)
        else:
            out[key] = CategoricalDistribution(list(values))
    return out


def training_settings(spec: TuneSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The flat training config for one trial: fixed settings, then the trial's parameters."""
    settings: dict[str, Any] = {"lora_dropout": 0.0, "batch_size": 8, "warmup_ratio": 0.1, "device": "cpu",
                                "save_steps": 0, "logging_steps": 1000, "seed": spec.seed, **spec.fixed}
    settings["num_epochs"] = spec.epochs
    for key, value in params.items():
        if key == "model":
            continue
        if key == "target_modules":
            settings["target_modules"] = spec.space.target_modules[value]
        elif key == "alpha_ratio":
            continue
        elif key == "r":
            settings["r"] = int(value)
        else:
            settings[key] = value
    rank = settings.get("r", 8)
    if "alpha_ratio" in params:
        settings["lora_alpha"] = float(params["alpha_ratio"]) * rank
    settings.setdefault("lora_alpha", 2.0 * rank)
    return settings

