"""The tuning spec (`loraforge tune SPEC`): parsed once into a typed, frozen `TuneSpec`.

Accepted: our YAML/JSON form and the seed's sweep space (`../seeds/configs/sweep_space_004.json`:
`space` with `rank`, `alpha: "rank * 2"`, `fixed`, `domains`) verbatim. Rules, in one place:

- Each search dimension is a list of values (categorical; a grid takes them as they are) or a range
  `{low, high, log}` (a grid takes `grid` points, default 3, spaced evenly — in log space if `log`).
- Alpha is searched either as `lora_alpha` values or as `alpha_ratio` (alpha = ratio x rank); the seed's
  `alpha: "rank * 2"` means `alpha_ratio: [2]`. Giving both is an error.
- `target_modules` values are module lists (or the names `attention`, `all-linear`); each is named by
  joining its modules with `+`, because Optuna's categorical choices must be plain values.
- `epochs` is the budget axis of every trial (validation accuracy is measured after each epoch, the
  trial scores its best epoch, `tpe+hyperband` prunes on it); it is not searched.
- The budget is `trials` (finished trials, not counting failed ones) and/or `minutes` (wall time of
  this run); `grid` defaults to the whole grid, `predict` to `samples + verify`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge.errors import ConfigError
from loraforge.names import check_name
from loraforge.structured import read_structured
from loraforge.tune.domains import DOMAINS

Strategy = Literal["grid", "random", "tpe", "gp", "tpe+hyperband", "predict"]
Objective = Literal["accuracy", "size", "time"]
STRATEGIES: tuple[str, ...] = ("grid", "random", "tpe", "gp", "tpe+hyperband", "predict")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULE_PRESETS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": ALL_LINEAR}
# What each objective means and which way it goes.
DIRECTIONS = {"accuracy": "maximize", "size": "minimize", "time": "minimize"}


class Range(BaseModel):
    """A numeric range. `grid` lists the points a grid search takes (default: `points` evenly spaced)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: Annotated[float, Field(allow_inf_nan=False)]
    high: Annotated[float, Field(allow_inf_nan=False)]
    log: bool = False
    points: Annotated[int, Field(ge=2, le=50)] = 3
    grid: list[float] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError("low must be below high")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        for value in self.grid or []:
            if not self.low <= value <= self.high:
                raise ValueError(f"grid point {value} is outside [low, high]")
        return self

    def grid_points(self) -> list[float]:
        if self.grid:
            return list(self.grid)
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            return [float(f"{math.exp(a + (b - a) * i / (self.points - 1)):.3g}") for i in range(self.points)]
        return [float(f"{self.low + (self.high - self.low) * i / (self.points - 1):.6g}") for i in range(self.points)]


Values = list[Any] | Range


class Space(BaseModel):
    """The search space. Unset dimensions are fixed (by `fixed`, or the training defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[list[str] | None, Field(description="base models to choose from (local names)")] = None
    r: Values | None = None
    lora_alpha: Values | None = None
    alpha_ratio: Values | None = None
    learning_rate: Values | None = None
    weight_decay: Values | None = None
    lora_dropout: Values | None = None
    target_modules: Annotated[dict[str, list[str]] | None, Field(description="named module sets")] = None

    @field_validator("r", "lora_alpha", "alpha_ratio", "learning_rate", "weight_decay", "lora_dropout", mode="before")
    @classmethod
    def _range_or_list(cls, value):
        if isinstance(value, dict):  # say what is wrong with the range, not that it isn't a list
            try:
                return Range(**value)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ValueError((f"{where}: " if where else "") + err["msg"].removeprefix("Value error, ")) from None
        if value is not None and not isinstance(value, list):
            raise ValueError("a list of values or a range {low, high, log}")
        return value

    @field_validator("model")
    @classmethod
    def _names(cls, value):
        for item in value or []:
            check_name(item, "space.model")
        return value

    @model_validator(mode="after")
    def _one_alpha(self) -> "Space":
        if self.lora_alpha is not None and self.alpha_ratio is not None:
            raise ValueError("give lora_alpha or alpha_ratio, not both")
        for key in ("model", "r", "lora_alpha", "alpha_ratio", "learning_rate", "weight_decay", "lora_dropout"):
            value = getattr(self, key)
            if isinstance(value, list) and not value:
                raise ValueError(f"{key} lists no values")
        if isinstance(self.r, Range) or (isinstance(self.r, list) and not all(isinstance(v, int) for v in self.r)):
            raise ValueError("r must be a list of whole numbers")
        return self

    def dimensions(self) -> dict[str, Values]:
        """Searched dimensions only, in a fixed order."""
        out: dict[str, Values] = {}
        for key in ("model", "r", "lora_alpha", "alpha_ratio", "learning_rate", "weight_decay", "lora_dropout"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.target_modules:
            out["target_modules"] = sorted(self.target_modules)
        return out


class PredictSettings(BaseModel):
    """The seed's method: `samples` random grid points, a scikit-learn surrogate, then the `verify` best."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: Annotated[int, Field(ge=3, le=10000)] = 16
    verify: Annotated[int, Field(ge=1, le=10000)] = 5
    surrogate: Literal["random_forest", "gradient_boosting", "gaussian_process"] = "random_forest"


class TuneSpec(BaseModel):
    """A whole, validated tuning request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str = "tiny"
    domains: list[str] = []
    dataset: str | None = None
    suite: str | None = None
    space: Space
    fixed: dict[str, Any] = {}
    epochs: Annotated[int, Field(ge=1, le=1000, description="epochs per trial (the budget axis)")] = 3
    train_size: Annotated[int, Field(ge=4, le=100000, description="training tasks per domain")] = 64
    validation_size: Annotated[int, Field(ge=2, le=100000)] = 32
    test_size: Annotated[int, Field(ge=0, le=100000)] = 32
    strategy: Strategy = "tpe"
    objectives: list[Objective] = ["accuracy"]
    trials: Annotated[int | None, Field(ge=1, le=100000)] = None
    minutes: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    predict: PredictSettings = PredictSettings()
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    price_per_hour: Annotated[float, Field(ge=0, allow_inf_nan=False, description="device price for `cost`")] = 0.0
    heartbeat_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 16

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in DOMAINS:
                raise ValueError(f"unknown domain {item!r}; known: {', '.join(sorted(DOMAINS))}")
        if len(set(value)) != len(value):
            raise ValueError("lists a domain twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TuneSpec":
        if bool(self.domains) == bool(self.dataset):
            raise ValueError("give domains (built-in tasks) or dataset + suite (your own), one of the two")
        if self.dataset and not self.suite:
            raise ValueError("a dataset needs a suite to score it (the validation issue's eval suite)")
        if len(set(self.objectives)) != len(self.objectives) or "accuracy" not in self.objectives:
            raise ValueError("objectives must include accuracy once, plus optionally size or time")
        if len(self.objectives) > 1 and self.strategy in ("tpe+hyperband", "predict"):
            raise ValueError(f"strategy {self.strategy} optimises one objective (accuracy)")
        for key in self.fixed:
            if key in self.space.dimensions() or (key == "lora_alpha" and self.space.alpha_ratio is not None):
                raise ValueError(f"fixed.{key} is also searched in space; keep one")
        if not self.space.dimensions():
            raise ValueError("the space searches nothing")
        return self

    @property
    def directions(self) -> list[str]:
        return [DIRECTIONS[o] for o in self.objectives]


_SEED_SPACE_KEYS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate"}


def _seed_dialect(raw: dict[str, Any]) -> dict[str, Any]:
    """The seed's sweep space → our form. Keys we don't search or fix (comments, `base_model_in_seed`,
    `result_record_example`, `seed_claim`) are its documentation and are dropped."""
    out = {k: v for k, v in raw.items() if k not in ("base_model_in_seed", "result_record_example", "seed_claim")}
    space = dict(out.get("space") or {})
    for seed_key, ours in _SEED_SPACE_KEYS.items():
        if seed_key in space:
            if ours in space:
                raise ConfigError(f"space.{seed_key} and space.{ours} set the same thing; keep one",
                                  field=f"space.{seed_key}")
            space[ours] = space.pop(seed_key)
    alpha = space.get("lora_alpha")
    if isinstance(alpha, str):
        ratio = re.fullmatch(r"(?:rank|r)\s*\*\s*([0-9]*\.?[0-9]+)", alpha.strip().lower())
        if ratio is None:
            raise ConfigError(f"space.alpha {alpha!r}: write a list of values or 'rank * K'", field="space.alpha")
        space["alpha_ratio"] = [float(ratio.group(1))]
        del space["lora_alpha"]
    out["space"] = space
    fixed = dict(out.get("fixed") or {})
    if "epochs" in fixed:
        out.setdefault("epochs", fixed.pop("epochs"))
    if "samples_per_domain" in fixed:
        out.setdefault("train_size", fixed.pop("samples_per_domain"))
    target = fixed.get("target_modules")
    if isinstance(target, str) and target in MODULE_PRESETS:
        fixed["target_modules"] = MODULE_PRESETS[target]
    out["fixed"] = fixed
    out["domains"] = [str(d).strip().lower().replace(" ", "-") for d in out.get("domains") or []]
    if "domain" in out:
        out["domains"] = out["domains"] + [str(out.pop("domain")).strip().lower().replace(" ", "-")]
    modules = space.get("target_modules")
    if isinstance(modules, list):  # a list of module lists or preset names → named sets
        named = {}
        for item in modules:
            mods = MODULE_PRESETS.get(item, None) if isinstance(item, str) else item
            if not isinstance(mods, list):
                raise ConfigError(f"space.target_modules: {item!r} is not a module list or one of "
                                  f"{sorted(MODULE_PRESETS)}", field="space.target_modules")
            named[item if isinstance(item, str) else "+".join(mods)] = mods
        space["target_modules"] = named
    return out


_FIXED_OK = {"lora_dropout", "target_modules", "r", "lora_alpha", "learning_rate", "weight_decay", "batch_size",
             "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler_type", "max_grad_norm", "device",
             "precision", "max_seq_length", "use_rslora", "quantization", "gradient_checkpointing"}


def parse_tune_spec(raw: Any, *, source: str = "tune spec", name: str | None = None) -> TuneSpec:
    """Validate a tuning spec; errors name the field (`space.learning_rate: low must be below high`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a tuning spec must be a mapping")
    raw = _seed_dialect({k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("_"))})
    if name is not None:
        raw["name"] = name
    if "name" not in raw:
        raw["name"] = Path(source).stem.lower().replace(" ", "-").replace("_", "-")
    check_name(raw["name"], "name")
    for key in raw.get("fixed") or {}:
        if key not in _FIXED_OK:
            raise ConfigError(f"fixed.{key}: not a setting the tuner passes to training "
                              f"(one of {', '.join(sorted(_FIXED_OK))})", field=f"fixed.{key}")
    try:
        spec = TuneSpec(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "Range", "function-")))
        raise ConfigError(f"{where or source}: {err['msg'].removeprefix('Value error, ')}",
                          field=where or None) from None
    return spec


def load_tune_spec(path: Path, *, name: str | None = None) -> tuple[TuneSpec, Path]:
    """Read a spec file; returns the spec and the folder its relative paths are relative to."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tuning spec {path.name!r} not found")
    return parse_tune_spec(read_structured(path), source=path.name, name=name), path.resolve().parent
