"""The adapter size report: what was trained, what is on disk, and the theoretical minimum."""

from __future__ import annotations

import struct
from pathlib import Path

from loraforge.train.plan import BYTES_PER_VALUE, TrainPlan


def safetensors_header_bytes(path: Path) -> int:
    """Bytes of metadata in a safetensors file: the 8-byte length plus the JSON header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    return 8 + length


def size_report(weights: Path, plan: TrainPlan, *, trainable_parameters: int) -> dict:
    on_disk = weights.stat().st_size
    header = safetensors_header_bytes(weights)
    per_value = BYTES_PER_VALUE[plan.spec.training.save_dtype]
    extra = trainable_parameters - plan.lora_parameters  # modules_to_save / biases, saved in full
    minimum = (plan.lora_parameters + max(0, extra)) * per_value
    return {
        "trainable_parameters": trainable_parameters,
        "lora_parameters": plan.lora_parameters,
        "bytes_per_value": per_value,
        "dtype": plan.spec.training.save_dtype,
        "theoretical_min_bytes": minimum,
        "bytes_on_disk": on_disk,
        "metadata_bytes": header,
        "overhead_ratio": round((on_disk - header) / minimum, 6) if minimum else None,
    }
