"""Peak memory of a training run (and of serving), offline, from the model's config and the training settings.

Every term follows what loraforge's own recipe keeps alive at its peak, the end of the first backward of
the largest forward of a step (after the first optimizer step, so AdamW's state exists):

- frozen weights: the base's parameters at the dtype training loads them in (fp32; bf16/fp16 for
  half precision; NF4 for QLoRA, ~0.52 bytes for decoder linear weights, embeddings and head in 16 bits);
- LoRA: its fp32 weights, their gradients and AdamW's two moments (16 bytes per parameter), and the
  same for `modules_to_save`;
- activations saved for the backward, per token per decoder layer: the fp32 copy each RMSNorm keeps,
  the MLP's gate, up and activation outputs, the attention's query, key, value and output (fp32 on the
  CPU's packed-attention path), each LoRA module's input (an fp32 copy per module when the base is in
  half precision or dropout is on; one copy per shared input otherwise), its dropout noise (fp32) and its rank-r
  product. With gradient checkpointing only each layer's input stays, plus one layer recomputed;
- the output layer and loss: logits, their fp32 log-softmax and gradients for one chunk of at most 256
  labelled positions (packed rows), or for every position of a padded micro-batch; twice over for KL
  retention (the base's and the adapted model's);
- allocator retention (CPU): glibc's heap holds freed activation blocks. Without checkpointing: half the
  live activations and logits again for one forward per step, more when a step runs several (see
  cpu_heap_factor). With checkpointing: the recomputation's blocks, where a layer's hidden states are
  smaller than the mmap threshold the recipe sets (see CPU_CHURN_PER_TOKEN_LAYER);
- framework overhead: a fixed allowance for code first run after the imports, autograd and the tokenizer.

The tokens of the largest forward come from the data when it is given (longest example, packing
window), else from `max_seq_length`. Serving: the weights, plus per concurrent sequence its KV cache
over the context and one row of logits.

`bench/estimate_accuracy.py` checks these predictions against measured peaks (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Which projections read the same input tensor (a full-precision base shares one saved copy among them).
_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                 "up_proj": "mlp_in", "w1": "mlp_in", "w3": "mlp_in", "o_proj": "attn_out"}
HEAD_CHUNK = 256  # labelled positions per output-layer chunk (train.step.forward_backward's default)
CPU_OVERHEAD = 24 * 2**20  # code first run after the imports, autograd graph, tokenizer (measured on tiny)
GPU_OVERHEAD = 64 * 2**20  # caching-allocator slack inside torch.cuda.max_memory_allocated (not measured)
# On the CPU the process's resident memory exceeds the live tensors: glibc keeps freed activation blocks in
# its heap and reuses them imperfectly. Measured without checkpointing (docs/estimate-accuracy.md): peak RSS
# above the static terms = 1.38-1.59 x the live activations and logits for one forward per step (SmolLM2 and
# tiny, 8 steps); 1.5 is used. A step of several forwards (accumulation, or examples too long to pack
# together) keeps more: 1.75 for two forwards on SmolLM2, 1.98 for four; tiny 1.72, 1.86, 1.85, 2.0 for 2, 4,
# 8, 16. Used: 1.5 + 0.5 x (1 - 1/forwards), its coefficient from SmolLM2's two-forward run.
CPU_HEAP_FACTOR = 1.5
CPU_HEAP_PER_EXTRA_FORWARD = 0.5
# With checkpointing the recipe fixes glibc's mmap threshold (recipe.return_freed_memory): blocks of at least
# MMAP_THRESHOLD go back to the system when freed. Where a layer's hidden states are smaller, the blocks the
# recomputation churns through come from the heap and stay: measured 16.5-24.5 KiB per token per layer in fp32
# on tiny and SmolLM2 at 128-1,024 tokens (10 configurations outside the benchmark's table); 20 KiB is used,
# halved for a half-precision base (its blocks are half the size; bounded by the benchmark, not measured alone).
MMAP_THRESHOLD = 1 << 20
CPU_CHURN_PER_TOKEN_LAYER = 20 * 1024
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, 8-bit absmax per 64, fp32 per 256 absmax (double quant)


@dataclass(frozen=True)
class Arch:
    """What the memory model needs from a transformers config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int  # every distinct parameter (tied embeddings once)
    embedding_parameters: int  # input embeddings + output head (once when tied)
    context: int

    @classmethod
    def from_config(cls, config, parameters: int) -> "Arch":
        text = getattr(config, "text_config", None) or config
        hidden = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd"))
        heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head"))
        kv = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        inter = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
        vocab = int(text.vocab_size)
        tied = bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True)))
        context = int(getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048)
        return cls(int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")), hidden, inter,
                   heads, kv, head_dim, vocab, parameters, vocab * hidden * (1 if tied else 2), context)


@dataclass(frozen=True)
class Settings:
    """The training settings the memory model reads (from a TrainSpec and its placement)."""

    device: str  # cpu, cuda, mps
    precision: str  # fp32, bf16, fp16
    quantization: str | None
    targets: dict[str, list[tuple[int, int]]]  # adapted module suffix -> (in, out) per occurrence
    r: int
    dropout: float
    modules_to_save_parameters: int
    lora_parameters: int
    packing: bool
    pack_max_tokens: int
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    retention: str  # none, replay, kl
    max_seq_length: int
    longest_example: int | None = None  # tokens, from the data when known
    mean_example: float | None = None  # tokens, from the data when known
    labelled_fraction: float = 1.0  # answer tokens / tokens, from the data when known
    checkpoint_bytes: int | None = None  # the weights' files on disk
    checkpoint_value_bytes: int = 4  # bytes per value in those files


@dataclass
class Estimate:
    terms: dict[str, int]  # the training step's peak, term by term
    forward_tokens: int  # tokens in the largest forward
    forward_rows: int
    loading_bytes: int = 0  # the peak while the base is read and converted (CPU: file pages + converted copy)
    notes: list[str] = field(default_factory=list)

    @property
    def training_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def total(self) -> int:
        return max(self.training_bytes, self.loading_bytes)

    @property
    def phase(self) -> str:
        return "loading" if self.loading_bytes > self.training_bytes else "training"

    def as_dict(self) -> dict:
        return {"peak_bytes": self.total, "peak_phase": self.phase, "training_bytes": self.training_bytes,
                "loading_bytes": self.loading_bytes, "terms": dict(self.terms),
                "forward_tokens": self.forward_tokens, "forward_rows": self.forward_rows, "notes": list(self.notes)}


def _weight_bytes(arch: Arch, s: Settings) -> int:
    if s.quantization == "4bit":
        decoder = arch.parameters - arch.embedding_parameters
        return int(decoder * NF4_BYTES + arch.embedding_parameters * 2)
    return arch.parameters * (4 if s.precision == "fp32" else 2)


def _longest(s: Settings) -> int:
    return min(s.longest_example or s.max_seq_length, s.max_seq_length)


def _per_forward(s: Settings, length: float) -> int:
    """Examples of `length` tokens that one packed forward holds (at most a step's window)."""
    return min(max(1, int(s.pack_max_tokens // length)), s.batch_size * s.gradient_accumulation_steps)


def forward_shape(s: Settings) -> tuple[int, int]:
    """(rows, tokens per row) of the largest forward of a step."""
    if not s.packing:
        return s.batch_size, _longest(s)
    return 1, _per_forward(s, _longest(s)) * _longest(s)


def typical_forward_tokens(s: Settings) -> int:
    """Tokens in a step's forward for examples of the data's mean length (the largest is forward_shape's)."""
    if not s.packing or not s.mean_example:
        rows, tokens = forward_shape(s)
        return rows * tokens
    mean = min(s.mean_example, s.max_seq_length)
    return int(_per_forward(s, mean) * mean)


def forwards_per_step(s: Settings) -> int:
    """Training forwards in one optimizer step, when every example is as long as the longest."""
    if not s.packing:
        return s.gradient_accumulation_steps
    return math.ceil(s.batch_size * s.gradient_accumulation_steps / _per_forward(s, _longest(s)))


def cpu_heap_factor(forwards: int) -> float:
    """Resident over live activations and logits on the CPU without checkpointing (see CPU_HEAP_FACTOR)."""
    return CPU_HEAP_FACTOR + CPU_HEAP_PER_EXTRA_FORWARD * (1 - 1 / max(1, forwards))


def _lora_input_bytes(arch: Arch, s: Settings) -> int:
    """Per token per layer: what the LoRA branches save (their inputs, dropout masks, rank-r products)."""
    half = s.precision != "fp32"
    total = 0
    # in fp32 on the CPU the output projection reads the attention's own output, already saved
    groups: set[str] = {"attn_out"} if s.device == "cpu" else set()
    for name, shapes in s.targets.items():
        fan_in = shapes[0][0]
        share = len(shapes) / arch.layers  # occurrences per layer (1 for a decoder projection)
        if s.dropout > 0:
            total += share * fan_in * (4 + 4)  # dropout's output and its fp32 noise mask, per module
        elif half or name not in _SHARED_INPUT:
            total += share * fan_in * 4
        elif _SHARED_INPUT[name] not in groups:
            groups.add(_SHARED_INPUT[name])
            total += share * fan_in * 4
        total += share * s.r * 4
    return int(total)


def _layer_bytes(arch: Arch, s: Settings) -> int:
    """Per token: what one decoder layer saves for the backward."""
    act = 4 if s.precision == "fp32" else 2
    q_dim = arch.heads * arch.head_dim
    kv_dim = arch.kv_heads * arch.head_dim
    norms = 2 * arch.hidden * 4 + 2 * 4  # fp32 input copy and 1/rms, twice
    attention_bytes = 4 if s.device == "cpu" else act  # the CPU's packed path runs attention in fp32
    attention = (2 * q_dim + 2 * kv_dim) * attention_bytes + arch.heads * 4  # q, k, v, out, logsumexp
    mlp = 3 * arch.intermediate * act  # gate, up, activation
    return norms + attention + mlp + _lora_input_bytes(arch, s)


def _head_bytes(arch: Arch, s: Settings, rows: int, tokens: int) -> int:
    """The output layer's peak: logits, fp32 log-softmax and their gradients for the positions at once."""
    act = 4 if s.precision == "fp32" else 2
    if s.packing:
        positions = min(HEAD_CHUNK, max(1, int(tokens * s.labelled_fraction)))
    else:
        positions = rows * tokens
    per_position = arch.vocab * (act + 4 + 4 + act)  # logits, log-softmax, its gradient, logits' gradient
    heads = 2 if s.retention == "kl" else 1  # the base's logits beside the adapted model's
    return positions * per_position * heads


def estimate_training(arch: Arch, s: Settings) -> Estimate:
    rows, tokens = forward_shape(s)
    act = 4 if s.precision == "fp32" else 2
    n = rows * tokens
    terms = {
        "frozen_weights": _weight_bytes(arch, s),
        "lora_weights": s.lora_parameters * 4,
        "lora_gradients": s.lora_parameters * 4,
        "optimizer_state": s.lora_parameters * 8,
    }
    if s.modules_to_save_parameters:
        terms["modules_to_save"] = s.modules_to_save_parameters * 16
    layer = _layer_bytes(arch, s)
    if s.gradient_checkpointing:
        activations = n * (arch.layers * arch.hidden * act + layer)
    else:
        activations = n * arch.layers * layer
    activations += n * arch.hidden * (act + 4 + 4)  # last hidden state, its detached copy's gradient, final norm
    if s.retention == "kl":
        activations += n * arch.hidden * act  # the base's hidden states for the KL chunks
    terms["activations"] = int(activations)
    terms["logits_and_loss"] = _head_bytes(arch, s, rows, tokens)
    if s.device == "cpu" and not s.gradient_checkpointing:
        heap = cpu_heap_factor(forwards_per_step(s))
        terms["allocator_retention"] = int((heap - 1) * (terms["activations"] + terms["logits_and_loss"]))
    elif s.device == "cpu" and typical_forward_tokens(s) * arch.hidden * act < MMAP_THRESHOLD:
        # checkpointing, where most forwards' hidden states are under the threshold (the data's mean length)
        terms["allocator_retention"] = int(CPU_CHURN_PER_TOKEN_LAYER * act / 4 * n * arch.layers)
    terms["framework_overhead"] = CPU_OVERHEAD if s.device in ("cpu", "mps") else GPU_OVERHEAD
    notes = [f"largest forward: {rows} x {tokens} tokens"]
    loading = 0
    if s.device in ("cpu", "mps") and s.quantization is None and s.checkpoint_bytes:
        # the files are memory-mapped; a dtype conversion holds their pages and the converted copy at once
        converted = (4 if s.precision == "fp32" else 2) != s.checkpoint_value_bytes
        loading = s.checkpoint_bytes + (terms["frozen_weights"] if converted else 0) + terms["framework_overhead"]
        if converted:
            notes.append(f"loading converts {s.checkpoint_value_bytes}-byte weights: file pages and the converted "
                         "copy are resident together")
    if s.device == "cuda":
        notes.append("CUDA figures follow the same model but were not checked against a GPU measurement")
    return Estimate(terms, tokens, rows, loading, notes)


def estimate_serving(arch: Arch, *, precision: str, quantization: str | None, context: int,
                     sequences: int = 1, device: str = "cpu") -> dict:
    """Serving: weights, then per concurrent sequence its KV cache over `context` tokens and its logits."""
    act = 4 if precision == "fp32" else 2
    weights = _weight_bytes(arch, Settings(device, precision, quantization, {}, 0, 0, 0, 0, True, 0, 1, 1,
                                           False, "none", context))
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * act * context
    logits = arch.vocab * 4
    overhead = CPU_OVERHEAD if device in ("cpu", "mps") else GPU_OVERHEAD
    return {"peak_bytes": weights + sequences * (kv + logits) + overhead,
            "terms": {"weights": weights, "kv_cache_per_sequence": kv, "logits_per_sequence": logits,
                      "framework_overhead": overhead},
            "sequences": sequences, "context": context}


def for_plan(plan, *, data: list | None = None, device: str | None = None, precision: str | None = None
             ) -> tuple[Estimate, "Arch", "Settings"]:
    """The training estimate of a TrainPlan; `data` (tokenized examples) sharpens the largest forward."""
    from loraforge.device import choose_placement
    from loraforge.models.resolve import load_config

    t, lora = plan.spec.training, plan.spec.lora
    if device is None or precision is None:
        placement = choose_placement(t.device, t.precision, width=plan.info.hidden_size)
        device, precision = device or placement.device, precision or placement.precision
    arch = Arch.from_config(load_config(plan.model), plan.info.num_parameters)
    targets = {m: plan.info.linear_modules[m] for m in lora.target_modules}
    saved = 0
    for m in lora.modules_to_save:
        if m in plan.info.linear_modules:
            saved += sum(i * o for i, o in plan.info.linear_modules[m])
        else:  # an embedding
            saved += arch.vocab * arch.hidden
    longest = fraction = mean = None
    if data:
        longest = max(len(d.input_ids) for d in data)
        mean = sum(len(d.input_ids) for d in data) / len(data)
        fraction = sum(d.loss_tokens for d in data) / max(1, sum(len(d.input_ids) for d in data))
    files, value_bytes = checkpoint_size(plan, arch)
    settings = Settings(device, precision, t.quantization, targets, lora.r, lora.lora_dropout, saved,
                        plan.lora_parameters, t.packing, t.pack_max_tokens, t.batch_size,
                        t.gradient_accumulation_steps, t.gradient_checkpointing, t.retention, plan.max_seq_length,
                        longest, mean, 1.0 if fraction is None else fraction, files, value_bytes)
    return estimate_training(arch, settings), arch, settings


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2}


def checkpoint_size(plan, arch: Arch) -> tuple[int, int]:
    """(bytes of the base's weight files, bytes per value): read from the safetensors headers of a local
    folder, else from the config's dtype times the parameters."""
    import json as _json
    import struct
    from pathlib import Path

    from loraforge.models.resolve import load_config

    folder = _local_folder(plan.model)
    if folder is not None:
        files = sorted(Path(folder).glob("*.safetensors"))
        if files:
            counts: dict[int, int] = {}
            for f in files:
                with open(f, "rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    header = _json.loads(handle.read(length))
                for name, entry in header.items():
                    if name != "__metadata__":
                        width = _DTYPE_BYTES.get(entry.get("dtype"), 4)
                        counts[width] = counts.get(width, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
            return sum(f.stat().st_size for f in files), max(counts, key=counts.get) if counts else 4
    dtype = str(getattr(load_config(plan.model), "dtype", None) or "float32").replace("torch.", "")
    width = _DTYPE_BYTES.get(dtype, 4)
    return arch.parameters * width, width


def _local_folder(ref) -> str | None:
    """The folder from_pretrained would read, where it already exists on this machine (nothing converted)."""
    from pathlib import Path

    from loraforge.models.resolve import _alias_for, model_folder, packaged_gguf

    if ref.kind in ("tiny", "gguf", "ollama"):
        return model_folder(ref)
    if ref.kind == "path":
        return ref.id if Path(ref.id).is_dir() else None
    if ref.kind == "alias" and (packaged_file := packaged_gguf(_alias_for(ref))) is not None:
        from loraforge.models.gguf import cached_folder

        folder = cached_folder(packaged_file)
        return str(folder) if folder else None
    return None


MEMORY_LIMIT_ENV = "LORAFORGE_MEMORY_LIMIT"  # e.g. 12GiB: the budget runs are checked against, not the machine's


def machine_memory(device: str) -> int | None:
    """Bytes a run may use: LORAFORGE_MEMORY_LIMIT when set, else the GPU's memory on CUDA, else the
    machine's physical memory."""
    import os

    if limit := os.environ.get(MEMORY_LIMIT_ENV, "").strip():
        return parse_bytes(limit)
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _with_training(plan, **changes):
    from loraforge.train.plan import plan_training

    spec = plan.spec.model_copy(update={"training": plan.spec.training.model_copy(update=changes)})
    return plan_training(spec)


def fixes(plan, estimate: Estimate, settings: Settings, data: list | None = None) -> list[tuple[str, int]]:
    """Changes that lower the peak, each with the peak it would give: (setting, bytes)."""
    t = plan.spec.training
    options: list[dict] = []
    if settings.precision == "fp32" and (settings.device != "cpu" or _cpu_bf16()):
        options.append({"precision": "bf16"})
    if settings.device == "cuda" and t.quantization is None:
        options.append({"quantization": "4bit"})
    if not t.gradient_checkpointing:
        options.append({"gradient_checkpointing": True})
    if t.batch_size > 1:
        options.append({"batch_size": max(1, t.batch_size // 2)})
    if t.packing and estimate.forward_tokens > settings.max_seq_length and t.pack_max_tokens > 8:
        options.append({"pack_max_tokens": max(8, t.pack_max_tokens // 2)})
    if plan.max_seq_length > 64 and not (data and max(len(d.input_ids) for d in data) > plan.max_seq_length // 2):
        options.append({"max_seq_length": plan.max_seq_length // 2})
    out = []
    for change in options:
        try:
            new, _, _ = for_plan(_with_training(plan, **change), data=data, device=settings.device,
                                 precision=change.get("precision", settings.precision))
        except Exception:  # a fix this model cannot take (e.g. 4-bit without bitsandbytes) is still named
            new = None
        key, value = next(iter(change.items()))
        shown = str(value).lower() if isinstance(value, bool) else value
        out.append((f"{key}: {shown}", new.total if new else -1))
    return sorted(out, key=lambda x: (x[1] < 0, x[1]))


def _cpu_bf16() -> bool:
    from loraforge.device import cpu_has_native_bf16

    return cpu_has_native_bf16()


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def refusal(plan, data: list | None = None) -> str | None:
    """Why this run cannot fit the machine (with the fixes), or None when it fits or the config says force."""
    if plan.spec.force:
        return None
    estimate, _, settings = for_plan(plan, data=data)
    limit = machine_memory(settings.device)
    if limit is None or estimate.total <= limit:
        return None
    named = "; ".join(f"{fix} -> {gib(peak)}" if peak >= 0 else fix for fix, peak in fixes(plan, estimate, settings, data))
    return (f"estimated peak memory {gib(estimate.total)} ({estimate.phase}) exceeds the {gib(limit)} this "
            f"{'GPU' if settings.device == 'cuda' else 'machine'} has. Fixes: {named or 'a smaller model'}. "
            "Set force: true to start anyway")


def tokenized(plan, examples: list) -> list | None:
    """The examples tokenized as training will, where the model's tokenizer is on this machine; else None
    (the estimate then plans for examples of max_seq_length tokens). Over-long records raise DataError."""
    folder = _local_folder(plan.model)
    if not examples or folder is None:
        return None
    from transformers import AutoTokenizer

    from loraforge.data import tokenize_examples

    return tokenize_examples(AutoTokenizer.from_pretrained(folder), examples, max_seq_length=plan.max_seq_length,
                             train_on_inputs=plan.spec.training.train_on_inputs, source="training data")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 1000**4, "tb": 1000**4, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'12GiB', '800 MB', '2e9' -> bytes; a ConfigError names the variable otherwise."""
    import re

    from loraforge.errors import ConfigError

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{MEMORY_LIMIT_ENV} must be a size such as 12GiB or 800MB, got {text!r}",
                          field=MEMORY_LIMIT_ENV)
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
