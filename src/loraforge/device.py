"""Device and precision chosen once, from what the machine has.

- CUDA: bf16 autocast where the GPU supports it, else fp16.
- Apple MPS: fp32 (fp16/bf16 autocast on request).
- CPU with native bf16 (AVX512-BF16 or AMX): bf16 for models at least BF16_MIN_WIDTH wide, else fp32.
  bf16 on the CPU means the frozen base is held in bf16 and the LoRA weights and optimizer stay fp32
  (no autocast: re-casting every frozen weight on every forward is what made autocast no faster).
  Measured on such a CPU (2 cores; docs/train-throughput.md): SmolLM2-135M-Instruct (576 wide) trains
  1.6x faster in bf16 than in fp32, with the loss after 22 steps within 2%; the built-in `tiny` (256 wide)
  trains 18% slower on short examples, where its products are too small for the bf16 kernels to pay.
- CPU without native bf16: fp32 (emulated bf16 is slower).

`precision: auto` means what `LORAFORGE_PRECISION` says when it is set (fp32, bf16 or fp16): one switch
for a whole test suite or machine. A config that names a precision wins over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import os

import torch

from loraforge.errors import DeviceError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_ENV = "LORAFORGE_PRECISION"
BF16_MIN_WIDTH = 512  # hidden size from which bf16 pays on a CPU with native bf16 (see above)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda", "mps" or "cpu"
    precision: str  # "fp32", "bf16" or "fp16"
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.precision == "fp32" else _DTYPES[self.precision]


def cpu_has_native_bf16() -> bool:
    cpu = torch.cpu
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except Exception:  # a probe that cannot run means "no"
                continue
    return False


def detect_device(requested: str = "auto") -> str:
    if requested not in ("auto", "cuda", "mps", "cpu"):
        raise DeviceError(f"device must be auto, cuda, mps or cpu, got {requested!r}", field="device")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but no CUDA GPU is available", field="device")
    if requested == "mps" and not (torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' was asked for but Apple MPS is not available", field="device")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_placement(device: str = "auto", precision: str = "auto", *, width: int | None = None) -> Placement:
    """Device and precision for a run; `width` (the model's hidden size) decides bf16 on a CPU."""
    dev = detect_device(device)
    if precision not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", field="precision")
    reason = "asked for in the config"
    if precision == "auto" and (forced := os.environ.get(PRECISION_ENV, "").strip()):
        if forced not in PRECISIONS[1:]:
            raise DeviceError(f"{PRECISION_ENV} must be one of {', '.join(PRECISIONS[1:])}, got {forced!r}",
                              field="precision")
        precision, reason = forced, f"set by {PRECISION_ENV}"
    if precision != "auto":
        if precision == "bf16" and dev == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("precision 'bf16' was asked for but this GPU does not support bf16", field="precision")
        if precision == "fp16" and dev == "cpu":
            raise DeviceError("precision 'fp16' is not supported on the CPU; use fp32 or bf16", field="precision")
        return Placement(dev, precision, reason)
    if dev == "cuda":
        if torch.cuda.is_bf16_supported():
            return Placement(dev, "bf16", "CUDA GPU with bf16 support")
        return Placement(dev, "fp16", "CUDA GPU without bf16 support")
    if dev == "mps":
        return Placement(dev, "fp32", "Apple MPS (fp32 unless asked otherwise)")
    if not cpu_has_native_bf16():
        return Placement(dev, "fp32", "CPU without native bf16: emulated bf16 is slower than fp32")
    if width is not None and width >= BF16_MIN_WIDTH:
        return Placement(dev, "bf16", f"CPU with native bf16 and a model {width} wide: bf16 base, fp32 LoRA")
    return Placement(dev, "fp32", f"CPU with native bf16, but a model {width or 'of unknown width'}"
                                  f"{' wide' if width else ''} is faster in fp32 (bf16 pays from {BF16_MIN_WIDTH})")


def cpu_description() -> str:
    """One line for logs: the vector extensions torch dispatches to and whether bf16 is native."""
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    return f"{capability}, native bf16 {'yes' if cpu_has_native_bf16() else 'no'}"
