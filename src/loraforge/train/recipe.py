"""The LoRA training recipe: setup → fit → save, top to bottom.

One readable loop on plain PyTorch (autocast + GradScaler), not HF Trainer and not accelerate's
Accelerator. Why: the loss is normalised by the labelled tokens of a whole accumulation window
(`batching.summed_token_loss`), which needs manual accumulation anyway; checkpoints must be pickle-free
(Trainer pickles RNG and optimizer state); and Accelerator keeps one mixed-precision mode per process,
while tests and tuning train many adapters with different settings in one process. What the loop does
is visible here: the optimizer step, the schedule, clipping, logging and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from loraforge import __version__, paths
from loraforge.batching import collate, pack, steps_per_epoch
from loraforge.data import Example, data_hash, tokenize_examples
from loraforge.device import choose_placement
from loraforge.models import load_base_model
from loraforge.models.resolve import fingerprint, model_folder
from loraforge.train import checkpoint as ckpt
from loraforge.train.attention import use_packed_attention
from loraforge.train.estimate import MMAP_THRESHOLD
from loraforge.train.step import forward_backward, head_mode
from loraforge.train.plan import TrainPlan
from loraforge.train.size import size_report

_SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Progress:
    """One progress event: what the bar, the metrics log and the job stream show."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    retention_loss: float | None = None  # the anchors' loss (per token), when retention is on


@dataclass
class TrainResult:
    adapter_dir: Path
    manifest: dict
    steps: int
    final_loss: float
    first_loss: float
    resumed_from: int | None = None
    history: list[dict] = field(default_factory=list)


class Stopped(Exception):
    """Raised when `should_stop` asks the loop to end (a cancelled job). Nothing is saved."""


class TrainingMonitor(Protocol):
    """Evaluates the model during training, keeps the best weights and may stop the run.

    `evals.monitor.KnowledgeMonitor` scores a knowledge suite; `tune.objective.EpochScorer` scores a
    tuning trial once per epoch and prunes it. An exception raised by `check` ends the run unsaved.
    """

    manifest_key: str

    def eval_interval(self, steps_per_epoch: int, total_steps: int, configured: int) -> int: ...

    def start(self, model, tokenizer, device: str) -> str: ...

    def check(self, model, tokenizer, device: str, step: int, epoch: float) -> tuple[str, bool, bool]:
        """(a log line, improved on the best so far, stop now)."""

    def best_step(self) -> int | None: ...

    def summary(self, stopped_at: int | None) -> dict: ...


def _estimate(plan, examples, data, placement, log) -> dict | None:
    """What `loraforge validate` predicted for this run (memory; time where a speed is cached), logged and
    kept in the manifest beside the measured figures."""
    from loraforge.train.calibrate import estimate_time
    from loraforge.train.estimate import for_plan, gib

    try:
        memory, _, _ = for_plan(plan, data=data, device=placement.device, precision=placement.precision)
        timing = estimate_time(plan, examples, data, forward_tokens=memory.forward_tokens)
    except Exception as exc:  # an estimate never stops a run
        log(f"estimate: not available ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    log(f"estimate: peak memory {gib(memory.total)} ({memory.phase})"
        + (f", {timing['seconds']:.0f} s of training" if timing["seconds"] is not None else ""))
    return {"peak_bytes": memory.total, "peak_phase": memory.phase, "seconds": timing["seconds"]}


def _measured_peak(device: str) -> int | None:
    """The peak this process reached: the GPU's allocated peak on CUDA, else the peak resident set."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return None


def return_freed_memory() -> None:
    """Make glibc hand freed blocks of 1 MiB and more back to the system (a fixed mmap threshold).

    Checkpointing recomputes each layer in the backward; with glibc's default (a threshold that grows
    with every freed block) the freed activations stay in the heap and the process grew step after step:
    measured on SmolLM2, 1,024 tokens, all linear layers, peak RSS 1,490 MiB after 6 steps where the live
    tensors never exceeded ~0.8 GiB (777 MiB with this fix). Checkpointing is chosen to save memory, so
    here memory wins; the cost is page faults on each large allocation. A lower threshold returns more
    and costs more: at glibc's starting value, 128 KiB, `tiny` at 1,016 tokens (its 256-wide activations
    just under 1 MiB, kept in the heap at 1 MiB) peaks at 89 MiB instead of 159 MiB but trains 53% slower,
    and SmolLM2 trains 22% slower for the same peak (docs/estimate-accuracy.md). Blocks under the threshold
    stay in the heap; the estimate counts them (estimate.CPU_CHURN_PER_TOKEN_LAYER). Process-wide; no-op off
    glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _file_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _config_hash(resolved: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def train(plan: TrainPlan, examples: list[Example], *, run_dir: Path, out_dir: Path, resume: bool = False,
          on_progress: Callable[[Progress], None] | None = None, log: Callable[[str], None] = print,
          should_stop: Callable[[], bool] = lambda: False, monitor: TrainingMonitor | None = None,
          init_adapter: Path | None = None) -> TrainResult:
    """Train a LoRA adapter as `plan` says and write the PEFT folder to `out_dir` (which must not exist).

    `monitor` (a `TrainingMonitor`) evaluates every few steps; the best evaluated weights are the ones
    saved, and it may end the run early. `init_adapter` (a verified PEFT folder
    with the same rank and targets) gives the starting weights: continuous updates start from the
    active version instead of from zero.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_scheduler

    spec, t = plan.spec, plan.spec.training
    # ---- setup ---------------------------------------------------------------------------------------
    placement = choose_placement(t.device, t.precision, width=plan.info.hidden_size)
    log(f"device {placement.device}, precision {placement.precision} ({placement.reason})")
    for note in spec.notes:
        log(f"config: {note}")
    torch.manual_seed(t.seed)
    load_dtype = torch.float32
    if placement.precision in ("bf16", "fp16"):
        load_dtype = placement.autocast_dtype  # frozen base in half precision; LoRA weights stay fp32
    model, tokenizer = load_base_model(plan.model, device=placement.device, dtype=load_dtype,
                                       quantization=t.quantization)
    data = tokenize_examples(tokenizer, examples, max_seq_length=plan.max_seq_length,
                             train_on_inputs=t.train_on_inputs, source="training data")
    base_fingerprint = fingerprint(model_folder(plan.model))
    estimate = _estimate(plan, examples, data, placement, log)
    anchors = None
    if t.retention != "none":  # the base answers the anchor prompts before any adapter exists
        from loraforge.scope import user_text
        from loraforge.train.retention import AnchorStream, anchor_examples, anchor_prompts, nearest_anchors

        anchor_data = anchor_examples(model, tokenizer, anchor_prompts(t.retention_anchors, plan.model.kind),
                                      device=placement.device, cache_key=f"{base_fingerprint}:{load_dtype}", log=log)
        near = None
        if t.retention_nearest > 0:  # each training example's neighbours among the anchors, by their prompts
            near = nearest_anchors([user_text(e.messages) for e in examples], [user_text(a.messages) for a in anchor_data],
                                   seed=t.seed)
        anchors = AnchorStream(tokenize_examples(tokenizer, anchor_data, max_seq_length=plan.max_seq_length,
                                                 train_on_inputs=False, source="anchors"), t.seed,
                               near=near, nearest_share=t.retention_nearest)
        log(f"retention: {t.retention} on {len(anchors.anchors)} anchors, {t.retention_ratio:g} per training "
            f"example, weight {t.retention_weight:g}"
            + (f", {t.retention_nearest:.0%} of them next to the step's questions" if near else ""))
    if t.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
        if placement.device == "cpu":
            return_freed_memory()
    lora_config = LoraConfig(
        r=spec.lora.r, lora_alpha=spec.lora.lora_alpha, lora_dropout=spec.lora.lora_dropout,
        target_modules=list(spec.lora.target_modules), bias=spec.lora.bias, task_type=spec.lora.task_type,
        modules_to_save=list(spec.lora.modules_to_save) or None, use_rslora=spec.lora.use_rslora,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices inside peft
        model = get_peft_model(model, lora_config)
    if init_adapter is not None:
        from safetensors.torch import load_file

        loaded = set_peft_model_state_dict(model, load_file(str(init_adapter / "adapter_model.safetensors")))
        misfits = loaded.unexpected_keys + [k for k in loaded.missing_keys if "lora_" in k]
        if misfits:
            raise ValueError(f"the starting adapter does not fit this config: {misfits[:3]}")
        log(f"starting from the weights of {init_adapter.parent.name}@{init_adapter.name}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)

    micro_batches = math.ceil(len(data) / t.batch_size)
    per_epoch = steps_per_epoch(micro_batches, t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(per_epoch * t.num_epochs))
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    if warmup >= total_steps:
        log(f"config: warmup ({warmup} steps) is not shorter than the run ({total_steps} steps): "
            "the learning rate never reaches its peak")
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(placement.device, enabled=placement.precision == "fp16")
    # On a GPU, autocast runs the LoRA products in half precision too. On the CPU the base is simply held
    # in bf16 (no re-cast of frozen weights on every forward) and peft runs the LoRA products in fp32.
    autocast = (torch.autocast(placement.device, dtype=placement.autocast_dtype)
                if placement.autocast_dtype is not None and placement.device != "cpu" else nullcontext())
    loss_mode = head_mode(model)
    per_example_attention = t.packing and use_packed_attention(model.get_base_model())
    log(f"{len(data)} examples, {micro_batches} micro-batches of {t.batch_size}, "
        f"{per_epoch} steps per epoch, {total_steps} steps")

    resolved = {**spec.resolved(), "max_seq_length": plan.max_seq_length}
    identity = {"config": _config_hash(resolved), "data": data_hash(examples),
                "init": _file_hash(init_adapter / "adapter_model.safetensors") if init_adapter else None}
    step, start_epoch, start_window = 0, 0, 0
    resumed_from = None
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (latest := ckpt.latest_checkpoint(run_dir)) is not None:
        saved = ckpt.read_state(latest)
        for key, value in identity.items():
            if saved["identity"].get(key) != value:
                raise ValueError(f"cannot resume: the {key} changed since checkpoint {latest.name}")
        state = ckpt.load_checkpoint(latest, model, optimizer)
        step, start_epoch, start_window = state["step"], state["epoch"], state["window"]
        if anchors is not None:
            anchors.position = state.get("anchors", 0)
        for _ in range(step):
            scheduler.step()
        resumed_from = step
        log(f"resumed from {latest.name} (step {step} of {total_steps})")
    metrics_path = run_dir / "metrics.jsonl"
    if not resume:
        metrics_path.unlink(missing_ok=True)
    best_state: dict | None = None
    stopped_at: int | None = None
    eval_every = 0
    if monitor is not None:
        eval_every = monitor.eval_interval(per_epoch, total_steps, t.eval_steps)
        model.eval()
        log(monitor.start(model, tokenizer, placement.device) + f"; evaluating every {eval_every} steps")
        model.train()

    # ---- fit -----------------------------------------------------------------------------------------
    started = time.perf_counter()
    tokens_seen = window_loss = retention_loss = 0.0
    window_count = 0
    history: list[dict] = []
    first_loss = None
    last_loss = float("nan")
    epoch = start_epoch
    while step < total_steps and stopped_at is None:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(t.seed + epoch)).tolist()
        batches = [order[i:i + t.batch_size] for i in range(0, len(order), t.batch_size)]
        windows = [batches[i:i + t.gradient_accumulation_steps]
                   for i in range(0, len(batches), t.gradient_accumulation_steps)]
        for w_index in range(start_window if epoch == start_epoch else 0, len(windows)):
            if step >= total_steps or stopped_at is not None:
                break
            if should_stop():
                raise Stopped()
            window = [data[i] for b in windows[w_index] for i in b]
            window_tokens = max(1, sum(e.loss_tokens for e in window))
            forwards = (pack(window, t.pack_max_tokens) if t.packing else
                        [collate([data[i] for i in b], tokenizer.pad_token_id) for b in windows[w_index]])
            if not per_example_attention:  # the block-diagonal mask transformers builds from position ids
                forwards = [{k: v for k, v in f.items() if k != "cu_seq_lens_q"} for f in forwards]
            loss_total = 0.0
            for batch in forwards:
                batch = {k: v.to(placement.device) for k, v in batch.items()}
                loss_total += forward_backward(model, batch, scale=1 / window_tokens, mode=loss_mode,
                                               backward=lambda x: scaler.scale(x).backward(),
                                               autocast=autocast) / window_tokens
                tokens_seen += int(batch["input_ids"].numel() if "position_ids" in batch
                                   else batch["attention_mask"].sum())
            if anchors is not None:
                picked = anchors.take(math.ceil(t.retention_ratio * len(window)),
                                      [i for b in windows[w_index] for i in b], epoch)
                anchor_tokens = max(1, sum(e.loss_tokens for e in picked))
                for batch in pack(picked, t.pack_max_tokens):
                    if not per_example_attention:
                        batch.pop("cu_seq_lens_q")
                    batch = {k: v.to(placement.device) for k, v in batch.items()}
                    retention_loss += forward_backward(
                        model, batch, scale=t.retention_weight / anchor_tokens, mode=loss_mode,
                        objective="ce" if t.retention == "replay" else "kl",
                        backward=lambda x: scaler.scale(x).backward(), autocast=autocast) / anchor_tokens
                    tokens_seen += int(batch["input_ids"].numel())
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm > 0
                                                            else float("inf")))
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            first_loss = loss_total if first_loss is None else first_loss
            window_loss += loss_total
            window_count += 1
            last_loss = loss_total

            if step % t.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - started
                done = step - (resumed_from or 0)
                event = Progress(step, total_steps, round(epoch + (w_index + 1) / len(windows), 4),
                                 round(window_loss / window_count, 6), lr, round(grad_norm, 6), int(tokens_seen),
                                 round(tokens_seen / elapsed, 1) if elapsed > 0 else 0.0, round(elapsed, 2),
                                 round(elapsed / done * (total_steps - step), 1) if done else 0.0,
                                 round(retention_loss / window_count, 6) if anchors is not None else None)
                history.append(asdict(event))
                with open(metrics_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(asdict(event)) + "\n")
                if on_progress:
                    on_progress(event)
                window_loss, window_count, retention_loss = 0.0, 0, 0.0
            if t.save_steps and step % t.save_steps == 0 and step < total_steps:
                nxt_epoch, nxt_window = (epoch, w_index + 1) if w_index + 1 < len(windows) else (epoch + 1, 0)
                ckpt.save_checkpoint(run_dir, model, optimizer, {
                    "step": step, "epoch": nxt_epoch, "window": nxt_window, "identity": identity,
                    "anchors": anchors.position if anchors is not None else 0,
                }, keep=t.save_total_limit)
                log(f"checkpoint saved at step {step}")
            if monitor is not None and (step % eval_every == 0 or step == total_steps):
                model.eval()
                line, improved, stop = monitor.check(model, tokenizer, placement.device, step,
                                                     epoch + (w_index + 1) / len(windows))
                model.train()
                log(f"step {step}: {line}" + (" (best so far)" if improved else ""))
                if improved:
                    best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
                if stop:
                    stopped_at = step
        epoch += 1
    elapsed = time.perf_counter() - started

    # ---- save ----------------------------------------------------------------------------------------
    from safetensors.torch import save_file

    model.eval()
    if monitor is not None and best_state is not None and monitor.best_step() != step:
        set_peft_model_state_dict(model, best_state)
        log(f"keeping the best evaluated weights, from step {monitor.best_step()}")
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{int(time.time() * 1000)}"
    tmp.mkdir(parents=True)
    try:  # a failed save (a full disk) leaves no half-written folder behind
        state = get_peft_model_state_dict(model)
        dtype = _SAVE_DTYPES[t.save_dtype]
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_config = model.peft_config["default"]
        peft_config.base_model_name_or_path = plan.model.id
        peft_config.save_pretrained(str(tmp))
        sizes = size_report(tmp / "adapter_model.safetensors", plan,
                            trainable_parameters=sum(p.numel() for p in trainable))
        all_history = ([json.loads(line) for line in metrics_path.read_text().splitlines()]
                       if metrics_path.exists() else [])
        manifest = {
            "tool": {"name": "loraforge", "version": __version__, "torch": torch.__version__},
            "base_model": {"requested": plan.model.requested, "id": plan.model.id,
                           "fingerprint": base_fingerprint},
            "config": resolved,
            "notes": list(spec.notes),
            "data": {"hash": identity["data"], "examples": len(examples),
                     "trained_tokens": sum(d.trained_tokens for d in data)},
            "training": {"device": placement.device, "precision": placement.precision, "steps": step,
                         "planned_steps": total_steps, "seconds": round(elapsed, 2), "first_loss": first_loss,
                         "final_loss": last_loss,
                         "resumed_from_step": resumed_from, "tokens": int(tokens_seen),
                         "peak_memory_bytes": _measured_peak(placement.device), "estimate": estimate},
            "size": sizes,
        }
        if anchors is not None:
            manifest["retention"] = {"method": t.retention, "anchors": len(anchors.anchors), "ratio": t.retention_ratio,
                                     "weight": t.retention_weight, "nearest": t.retention_nearest,
                                     "anchor_examples_seen": anchors.position}
        if monitor is not None:
            manifest[monitor.manifest_key] = monitor.summary(stopped_at)
        paths.atomic_write_json(tmp / "loraforge.json", manifest)
        with open(tmp / "metrics.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(h) + "\n" for h in all_history)
        paths.publish_dir(tmp, out_dir)
    except BaseException:
        paths.remove_tree(tmp)
        raise
    del model, optimizer
    if placement.device == "cuda":
        torch.cuda.empty_cache()
    return TrainResult(out_dir, manifest, step, last_loss, first_loss or float("nan"), resumed_from,
                       all_history)
