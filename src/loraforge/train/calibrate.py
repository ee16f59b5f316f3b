"""Training time before training: the planned tokens times a speed measured once on this machine.

The speed is not guessed from peak FLOPs: `calibrate` runs a few steps of loraforge's own recipe on the
run's data (first step timed apart: it pays for warm-up), and caches seconds per token under a key of
everything that changes it — the model, device, precision, quantization, adapted layers, rank,
checkpointing, retention, packing, the size of the largest forward, and the threads torch uses. The
cache is one JSON file in the store (`cache/calibration.json`), written atomically.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from loraforge import paths

CALIBRATION_STEPS = 5  # the first is warm-up; the speed comes from the other four
# Steps that fast (tiny models, short sequences) are timed again over more steps: over four steps of a few
# hundredths of a second the timer and the scheduler decide the speed, and the warm-up's tail weighs in
# (tiny, 128 tokens: 0.044 s per step from 4 steps, 0.035 over 100; docs/estimate-accuracy.md).
MIN_CALIBRATION_SECONDS = 2.0
MAX_CALIBRATION_STEPS = 200


def _cache_path() -> Path:
    return paths.home() / "cache" / "calibration.json"


def _read_cache() -> dict:
    try:
        cache = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_entry(key: str, entry: dict) -> None:
    cache = _read_cache()
    cache[key] = entry
    _cache_path().parent.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_json(_cache_path(), cache)


def cache_key(plan, forward_tokens: int) -> str:
    import torch

    from loraforge.device import choose_placement, cpu_description

    t, lora = plan.spec.training, plan.spec.lora
    placement = choose_placement(t.device, t.precision, width=plan.info.hidden_size)
    bucket = 2 ** math.ceil(math.log2(max(8, forward_tokens)))
    parts = [plan.model.id, placement.device, placement.precision, t.quantization or "-",
             ",".join(sorted(lora.target_modules)), f"r{lora.r}", f"ckpt{int(t.gradient_checkpointing)}",
             t.retention, f"pack{int(t.packing)}", f"fwd{bucket}", f"threads{torch.get_num_threads()}",
             cpu_description() if placement.device == "cpu" else placement.device]
    return "|".join(parts)


def planned_tokens(plan, data: list) -> int:
    """Tokens the run will push through the model (the recipe's `tokens` count), training examples only."""
    from loraforge.batching import steps_per_epoch

    t = plan.spec.training
    per_epoch_tokens = sum(len(d.input_ids) for d in data)
    micro = math.ceil(len(data) / t.batch_size)
    per_epoch = steps_per_epoch(micro, t.gradient_accumulation_steps)
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(per_epoch * t.num_epochs))
    return int(per_epoch_tokens * total / per_epoch)


def _speed(history: list[dict]) -> dict | None:
    if len(history) < 2:
        return None
    first, last = history[0], history[-1]
    tokens = last["tokens"] - first["tokens"]
    if tokens <= 0 or last["elapsed_s"] <= first["elapsed_s"]:
        return None
    per_token = (last["elapsed_s"] - first["elapsed_s"]) / tokens
    warmup = max(0.0, first["elapsed_s"] - first["tokens"] * per_token)
    return {"seconds_per_token": per_token, "first_step_extra_s": warmup}


def calibrate(plan, examples: list, forward_tokens: int, log=lambda m: None) -> dict:
    """Run CALIBRATION_STEPS steps of the recipe on `examples` and cache the measured speed."""
    from loraforge.train.recipe import train

    t = plan.spec.training

    def run(steps: int) -> list[dict]:
        needed = steps * t.batch_size * t.gradient_accumulation_steps
        sample = [examples[i % len(examples)] for i in range(needed)]
        spec = plan.spec.model_copy(update={"training": t.model_copy(update={
            "max_steps": steps, "logging_steps": 1, "save_steps": 0}), "eval_suite": None})
        calibration_plan = type(plan)(spec, plan.model, plan.info, plan.max_seq_length, plan.lora_parameters,
                                      plan.theoretical_min_bytes)
        with tempfile.TemporaryDirectory(prefix="loraforge-calibrate-") as tmp:
            return train(calibration_plan, sample, run_dir=Path(tmp) / "run", out_dir=Path(tmp) / "out",
                         log=log).history

    steps = CALIBRATION_STEPS
    history = run(steps)
    timed = history[-1]["elapsed_s"] - history[0]["elapsed_s"] if len(history) > 1 else 0.0
    if 0 < timed < MIN_CALIBRATION_SECONDS:  # fast steps: time enough of them to outweigh the timer's noise
        steps = min(MAX_CALIBRATION_STEPS, 1 + math.ceil((steps - 1) * MIN_CALIBRATION_SECONDS / timed))
        history = run(steps)
    speed = _speed(history)
    if speed is None:
        raise RuntimeError("calibration measured no speed")
    entry = {**speed, "source": f"calibration ({steps} steps)"}
    _write_entry(cache_key(plan, forward_tokens), entry)
    return entry


def estimate_time(plan, examples: list, data: list, *, measure: bool = False, forward_tokens: int | None = None,
                  log=lambda m: None) -> dict:
    """{"seconds", "planned_tokens", "seconds_per_token", "calibrated"}; seconds is None when no speed is
    cached for these settings and `measure` is False."""
    from loraforge.train.estimate import for_plan

    if forward_tokens is None:
        forward_tokens = for_plan(plan, data=data)[0].forward_tokens
    key = cache_key(plan, forward_tokens)
    entry = _read_cache().get(key)
    if not (isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] >= 0
                                            for k in ("seconds_per_token", "first_step_extra_s"))):
        entry = None  # a damaged or hand-edited entry is measured again, never trusted
    how = "cached" if entry else None
    if entry is None and measure and examples:
        log("calibrating the training speed (once for these settings on this machine)")
        entry, how = calibrate(plan, examples, forward_tokens, log=log), "measured now"
    tokens = planned_tokens(plan, data)
    out = {"planned_tokens": tokens, "seconds": None, "seconds_per_token": None, "calibrated": how, "key": key}
    if entry is not None:
        factor = 1.0
        if plan.spec.training.retention != "none":  # anchors: retention_ratio per example, at the data's mean length
            factor += plan.spec.training.retention_ratio
        seconds = tokens * factor * entry["seconds_per_token"] + entry["first_step_extra_s"]
        out.update(seconds=round(seconds, 1), seconds_per_token=entry["seconds_per_token"],
                   source=entry.get("source"))
    return out
