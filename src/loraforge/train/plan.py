"""Check a TrainSpec against its base model, offline, before anything is loaded or trained."""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.config import TrainSpec, with_notes
from loraforge.errors import ConfigError
from loraforge.models import BaseModelRef, ModelInfo, model_info, resolve_base_model

BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TrainPlan:
    spec: TrainSpec
    model: BaseModelRef
    info: ModelInfo
    max_seq_length: int
    lora_parameters: int  # Σ r·(in+out) over adapted modules
    theoretical_min_bytes: int  # lora_parameters × bytes per saved value

    def summary(self) -> dict:
        return {
            "model": {"requested": self.model.requested, "id": self.model.id, "architecture": self.info.architecture,
                      "parameters": self.info.num_parameters, "context_length": self.info.context_length},
            "max_seq_length": self.max_seq_length,
            "adapted_modules": sum(len(self.info.linear_modules[m]) for m in self.spec.lora.target_modules),
            "lora_parameters": self.lora_parameters,
            "theoretical_min_bytes": self.theoretical_min_bytes,
        }


def lora_parameter_count(info: ModelInfo, target_modules: list[str], r: int) -> int:
    return sum(r * (fan_in + fan_out) for m in target_modules for fan_in, fan_out in info.linear_modules[m])


def plan_training(spec: TrainSpec) -> TrainPlan:
    """Resolve the model and check every model-dependent bound; notes record defaults applied."""
    ref = resolve_base_model(spec.model_name, trust_remote_code=spec.trust_remote_code)
    notes = []
    if spec.model_name is None:
        notes.append(f"model_name not given: the default model {ref.requested!r} is used")
    info = model_info(ref)
    available = sorted(info.linear_modules)
    missing = [m for m in spec.lora.target_modules if m not in info.linear_modules]
    if missing:
        raise ConfigError(f"target_modules {missing} not found in {ref.requested}; its linear modules are: "
                          f"{', '.join(available)}", field="target_modules")
    missing_save = [m for m in spec.lora.modules_to_save if m not in info.linear_modules and m not in (
        "embed_tokens", "wte", "word_embeddings")]
    if missing_save:
        raise ConfigError(f"modules_to_save {missing_save} not found in {ref.requested}; its linear modules are: "
                          f"{', '.join(available)}", field="modules_to_save")
    max_len = spec.training.max_seq_length
    if max_len is None:
        max_len = min(2048, info.context_length)
        notes.append(f"max_seq_length not given: {max_len} (min of 2048 and the model's context)")
    elif max_len > info.context_length:
        raise ConfigError(f"max_seq_length {max_len} exceeds the context of {ref.requested} "
                          f"({info.context_length} tokens)", field="max_seq_length")
    params = lora_parameter_count(info, spec.lora.target_modules, spec.lora.r)
    spec = with_notes(spec, *notes) if notes else spec
    return TrainPlan(spec, ref, info, max_len, params, params * BYTES_PER_VALUE[spec.training.save_dtype])
