"""Training configuration: parsed once at the boundary into a typed, frozen `TrainSpec`.

Accepted forms, all resolving to the same spec:
- the seed's nested form: `lora_config: {...}`, `training_config: {...}` plus top-level keys;
- Hugging Face argument names (`num_train_epochs`, `per_device_train_batch_size`, `max_steps`);
- a flat form (every key at the top level), in JSON or YAML.

Rules, in one place:
- Unknown keys are errors naming the key and the nearest valid one. Keys starting with `_` are
  comments and are ignored.
- Synonyms (`num_epochs` / `num_train_epochs`, `batch_size` / `per_device_train_batch_size`,
  a key given both flat and nested) must agree; different values are an error.
- Overlaps: `max_steps` > 0 beats epochs, and `warmup_steps` > 0 beats `warmup_ratio` (both as in
  transformers). The spec's `notes` say which applied, and the run log prints them.
- The adapter's name comes from `--name`, else `name`, else `output_dir` (`./adapters/NAME`), else
  the config file's name (noted). An `output_dir` outside `./adapters/` is refused.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraforge.errors import ConfigError
from loraforge.structured import read_structured
from loraforge.names import check_name
from loraforge.scope import DEFAULT_THRESHOLD

Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
SaveDtype = Literal["float32", "bfloat16", "float16"]


class LoraSettings(BaseModel):
    """The adapter's shape (peft `LoraConfig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: Annotated[int, Field(ge=1, le=4096, description="LoRA rank")] = 8
    lora_alpha: Annotated[float, Field(gt=0, allow_inf_nan=False, description="scale = alpha / r")] = 16.0
    lora_dropout: Annotated[float, Field(ge=0, lt=1, description="dropout on the LoRA input")] = 0.05
    target_modules: Annotated[list[str], Field(min_length=1, description="linear layers to adapt, by suffix")] = [
        "q_proj", "v_proj"]
    bias: Annotated[Literal["none", "all", "lora_only"], Field(description="which biases to train")] = "none"
    task_type: Annotated[Literal["CAUSAL_LM"], Field(description="only causal LMs are supported")] = "CAUSAL_LM"
    modules_to_save: Annotated[list[str], Field(description="whole modules to train and save (e.g. lm_head)")] = []
    use_rslora: Annotated[bool, Field(description="scale by alpha/sqrt(r) (rank-stabilised LoRA)")] = False

    @field_validator("target_modules", "modules_to_save")
    @classmethod
    def _distinct_names(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or not item.replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"invalid module name {item!r}")
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice")
        return value


class TrainingSettings(BaseModel):
    """How the adapter is trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_epochs: Annotated[float, Field(gt=0, le=100000, allow_inf_nan=False, description="passes over the data")] = 3
    max_steps: Annotated[int, Field(ge=-1, description="optimizer steps; > 0 beats num_epochs")] = -1
    batch_size: Annotated[int, Field(ge=1, le=4096, description="examples per micro-batch")] = 1
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 1
    learning_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lr_scheduler_type: Scheduler = "cosine"
    max_seq_length: Annotated[int | None, Field(ge=8, description="longest example in tokens; "
                                                "default min(2048, model context)")] = None
    max_grad_norm: Annotated[float, Field(ge=0, allow_inf_nan=False, description="0 disables clipping")] = 1.0
    logging_steps: Annotated[int, Field(ge=1)] = 10
    save_steps: Annotated[int, Field(ge=0, description="checkpoint every N steps; 0 disables")] = 500
    save_total_limit: Annotated[int, Field(ge=1)] = 2
    eval_steps: Annotated[int | None, Field(ge=1, description="evaluate the eval_suite every N steps "
                                                  "(default: a tenth of the run)")] = None
    eval_target: Annotated[float, Field(gt=0, le=1, description="stop when the eval_suite's efficacy "
                                        "reaches this")] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    train_on_inputs: Annotated[bool, Field(description="also take loss on prompt tokens")] = False
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    quantization: Annotated[Literal["4bit"] | None, Field(description="QLoRA: 4-bit base (CUDA only)")] = None
    gradient_checkpointing: bool = False
    packing: Annotated[bool, Field(description="pack each accumulation window's examples into one sequence "
                                   "(block-diagonal attention; same gradient, faster)")] = True
    pack_max_tokens: Annotated[int, Field(ge=8, le=1_048_576, description="most tokens in one packed forward "
                                          "(bounds activation memory)")] = 512
    save_dtype: Annotated[SaveDtype, Field(description="dtype of the saved adapter weights")] = "float32"
    retention: Annotated[Literal["none", "replay", "kl"], Field(
        description="keep what the base knew while learning: replay the base's own answers to anchor prompts "
                    "(cross-entropy), or hold the adapted model's next-token distribution on them close to "
                    "the base's (KL, adapter switched off as the teacher)")] = "none"
    retention_anchors: Annotated[str, Field(min_length=1, description="anchor prompts: builtin, or a JSONL/JSON "
                                            "file of {prompt}")] = "builtin"
    retention_ratio: Annotated[float, Field(gt=0, le=16, allow_inf_nan=False, description="anchor examples "
                                            "per training example in each step")] = 1.0
    retention_weight: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False, description="weight of the "
                                             "anchor loss beside the training loss (each per token)")] = 1.0
    retention_nearest: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, description="share of each "
                                              "step's anchors chosen next to the step's training questions "
                                              "(TF-IDF similarity) instead of at random")] = 0.0
    scope: Annotated[Literal["all", "near"], Field(
        description="which questions the adapter answers when served and evaluated: all, or only those near "
                    "its training questions (TF-IDF similarity >= scope_threshold), the base answering the "
                    "rest")] = "all"
    scope_threshold: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, description="with scope near: the "
                                            "similarity to the nearest training question at which the adapter "
                                            "answers")] = DEFAULT_THRESHOLD


class TrainSpec(BaseModel):
    """A whole, validated training request. `notes` record every resolution rule that applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model_name: str | None = None
    description: str = ""
    training_data: list[Any] | str | None = None
    trust_remote_code: bool = False
    force: bool = Field(default=False, description="start even when the memory estimate exceeds the machine's")
    eval_suite: dict[str, Any] | str | None = None
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    notes: tuple[str, ...] = ()

    def resolved(self) -> dict[str, Any]:
        """The flat, canonical form stored with every adapter version (data left out: it is hashed)."""
        return {"name": self.name, "model_name": self.model_name, "description": self.description,
                "trust_remote_code": self.trust_remote_code,
                **({"eval_suite": self.eval_suite} if self.eval_suite is not None else {}),
                **self.lora.model_dump(), **self.training.model_dump()}


_TOP_KEYS = {"name", "model_name", "description", "output_dir", "training_data", "trust_remote_code", "force",
             "eval_suite"}
_LORA_KEYS = set(LoraSettings.model_fields)
_TRAINING_KEYS = set(TrainingSettings.model_fields)
# Alternative spellings -> canonical key. Booleans that map to a value are handled in _canonical_value.
_ALIASES = {
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size",
    "lr_scheduler": "lr_scheduler_type",
    "load_in_4bit": "quantization",
    "bf16": "precision",
    "fp16": "precision",
}
_SECTIONS = {"lora_config": _LORA_KEYS, "training_config": _TRAINING_KEYS | {k for k, v in _ALIASES.items()
                                                                              if v in _TRAINING_KEYS}}
_ALL_KEYS = _TOP_KEYS | _LORA_KEYS | _TRAINING_KEYS | set(_ALIASES) | set(_SECTIONS)


# Common names that are not accepted, and the key they most likely mean.
_HINTS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate",
          "epochs": "num_epochs", "modules": "target_modules", "model": "model_name", "base_model": "model_name",
          "grad_accum": "gradient_accumulation_steps", "scheduler": "lr_scheduler_type", "data": "training_data"}


def _suggest(key: str, options: set[str]) -> str:
    if _HINTS.get(key) in options:
        return f" (did you mean {_HINTS[key]!r}?)"
    close = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _canonical_value(key: str, value: Any, where: str) -> tuple[str, Any] | None:
    """Map an alias and its value to the canonical key; None when a false boolean says nothing."""
    canonical = _ALIASES.get(key, key)
    if key in ("bf16", "fp16", "load_in_4bit"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false", field=where)
        if not value:
            return None
        return canonical, {"bf16": "bf16", "fp16": "fp16", "load_in_4bit": "4bit"}[key]
    return canonical, value


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict; errors name the file."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {Path(path).name!r} not found")
    raw = read_structured(Path(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{Path(path).name}: a config must be a mapping of keys to values")
    return raw


def _collect(raw: dict[str, Any]) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """Flatten every dialect into canonical key -> (value, where it was written)."""
    settings: dict[str, tuple[Any, str]] = {}
    notes: list[str] = []

    def put(key: str, value: Any, where: str) -> None:
        mapped = _canonical_value(key, value, where)
        if mapped is None:
            return
        canonical, value = mapped
        if canonical in settings:
            previous, prev_where = settings[canonical]
            if previous != value:
                raise ConfigError(f"{where}={value!r} conflicts with {prev_where}={previous!r}: "
                                  "they set the same thing; keep one", field=where)
            notes.append(f"{where} and {prev_where} both set {canonical}={value!r} (same value)")
            return
        settings[canonical] = (value, where)

    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}")
        if key.startswith("_"):
            continue
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping", field=key)
            for sub, sub_value in value.items():
                where = f"{key}.{sub}"
                if not isinstance(sub, str) or sub.startswith("_"):
                    continue
                if sub not in _SECTIONS[key]:
                    raise ConfigError(f"unknown key {where!r}{_suggest(sub, _SECTIONS[key])}", field=where)
                put(sub, sub_value, where)
        elif key in _ALL_KEYS:
            put(key, value, key)
        else:
            raise ConfigError(f"unknown key {key!r}{_suggest(key, _ALL_KEYS)}", field=key)
    return settings, notes


def _name_from_output_dir(output_dir: Any) -> str:
    if not isinstance(output_dir, str) or not output_dir.strip():
        raise ConfigError("output_dir must be a path such as ./adapters/NAME", field="output_dir")
    text = output_dir.replace("\\", "/")
    pure = PurePosixPath(text)
    parts = [p for p in pure.parts if p != "."]
    if "//" in text:
        parts = []  # empty segments: refuse rather than guess
    if pure.is_absolute() or ".." in parts or not parts or len(parts) > 2 or (
            len(parts) == 2 and parts[0] != "adapters"):
        raise ConfigError(f"output_dir {output_dir!r} escapes the adapter store: use ./adapters/NAME "
                          "(NAME becomes the adapter's name in the store)", field="output_dir")
    return check_name(parts[-1], "output_dir")


def _pydantic_error(exc: ValidationError, wheres: dict[str, str]) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = loc[-1] if loc else "config"
    where = wheres.get(key, key)
    message = err["msg"]
    if err["type"] == "finite_number":
        message = "must be a finite number"
    return ConfigError(f"{where}: {message}", field=where)


def parse_train_config(raw: Any, *, source: str = "config", name: str | None = None,
                       model_name: str | None = None, training_data: Any = None) -> TrainSpec:
    """Validate a config in any accepted dialect. `name`, `model_name`, `training_data` override it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a JSON object / YAML mapping")
    if "space" in raw and "domains" in raw:
        raise ConfigError(f"{source} is a tuning search space (loraforge tune), not a training config")
    settings, notes = _collect(raw)
    values = {key: value for key, (value, _where) in settings.items()}
    wheres = {key: where for key, (_value, where) in settings.items()}

    for key, value in (("model_name", model_name), ("training_data", training_data)):
        if value is not None:
            if key in values and values[key] != value:
                notes.append(f"{key} from the command line replaces {wheres[key]} in {source}")
            values[key] = value

    output_dir = values.pop("output_dir", None)
    dir_name = _name_from_output_dir(output_dir) if output_dir is not None else None
    adapter_name = name or values.pop("name", None)
    values.pop("name", None)
    if adapter_name is not None:
        check_name(adapter_name, "name")
        if dir_name and dir_name != adapter_name and not name:
            raise ConfigError(f"name {adapter_name!r} and output_dir {output_dir!r} disagree", field="name")
        if dir_name and dir_name != adapter_name:
            notes.append(f"adapter name {adapter_name!r} from the command line replaces output_dir {output_dir!r}")
    elif dir_name:
        adapter_name = dir_name
    else:
        stem = Path(source).stem.lower().replace(" ", "-")
        try:
            adapter_name = check_name(stem, "name")
        except Exception:
            raise ConfigError("the adapter needs a name: give output_dir: ./adapters/NAME, name: NAME, "
                              "or --name", field="name") from None
        notes.append(f"adapter name {adapter_name!r} taken from the config file name "
                     "(no name or output_dir given)")

    lora = {k: v for k, v in values.items() if k in _LORA_KEYS}
    training = {k: v for k, v in values.items() if k in _TRAINING_KEYS}
    top = {k: v for k, v in values.items() if k in _TOP_KEYS}
    try:
        lora_settings = LoraSettings(**lora)
        training_settings = TrainingSettings(**training)
        spec_kwargs = {"name": adapter_name, **top}
        TrainSpec(**spec_kwargs)
    except ValidationError as exc:
        raise _pydantic_error(exc, wheres) from None

    if training_settings.max_steps > 0 and "num_epochs" in values:
        notes.append(f"max_steps={training_settings.max_steps} applies; {wheres['num_epochs']}="
                     f"{values['num_epochs']} is not used (max_steps beats epochs, as in transformers)")
    if training_settings.warmup_steps > 0 and training_settings.warmup_ratio > 0:
        notes.append(f"warmup_steps={training_settings.warmup_steps} applies; warmup_ratio="
                     f"{training_settings.warmup_ratio} is not used (steps beat ratio, as in transformers)")
    if training_settings.eval_steps is not None and "eval_suite" not in values:
        notes.append(f"eval_steps={training_settings.eval_steps} is recorded; no evaluation runs during "
                     "training unless an eval suite is configured")
    if not math.isfinite(training_settings.learning_rate):  # belt and braces: pydantic checks this too
        raise ConfigError("learning_rate must be finite", field=wheres.get("learning_rate", "learning_rate"))
    return TrainSpec(name=adapter_name, lora=lora_settings, training=training_settings, notes=tuple(notes), **top)


def with_notes(spec: TrainSpec, *extra: str) -> TrainSpec:
    return spec.model_copy(update={"notes": spec.notes + tuple(extra)})
