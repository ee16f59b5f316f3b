"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder `checkpoint-<step>` holds the trainable weights, AdamW's state, the RNG states
and `state.json` (step, position in the data, hashes of the config and data it belongs to). It is
written to a temporary folder and renamed, so a crash mid-write leaves no half checkpoint.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraforge import paths

STATE = "state.json"


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, model, optimizer, state: dict, *, keep: int) -> Path:
    params = _trainable(model)
    index = {id(p): name for name, p in params.items()}
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{index[id(p)]}::{key}"] = value.detach().cpu().contiguous()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    tmp = run_dir / f".tmp-checkpoint-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "weights.safetensors"))
    save_file(tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    paths.atomic_write_json(tmp / STATE, {**state, "param_groups": groups})
    final = run_dir / f"checkpoint-{state['step']}"
    paths.remove_tree(final)
    paths.publish_dir(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        paths.remove_tree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text())


def load_checkpoint(checkpoint: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; return the saved state."""
    state = read_state(checkpoint)
    params = _trainable(model)
    weights = load_file(str(checkpoint / "weights.safetensors"))
    if set(weights) != set(params):
        raise ValueError("checkpoint does not match the model's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    saved = load_file(str(checkpoint / "optimizer.safetensors"))
    names = {id(p): name for name, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            slots = {k.split("::", 1)[1]: v for k, v in saved.items() if k.split("::", 1)[0] == name}
            if slots:
                optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in slots.items()}
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
        for key, value in saved_group.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    rng = load_file(str(checkpoint / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return state
