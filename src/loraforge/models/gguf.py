"""GGUF files as base models: checked, de-quantized once into a cached safetensors folder, then used
like any local folder.

A GGUF file (llama.cpp, Ollama, LM Studio) holds quantized weights plus the config, tokenizer and chat
template as metadata. transformers reads it (`from_pretrained(folder, gguf_file=...)`) and de-quantizes
every tensor; that takes seconds to minutes, so it happens once per file: the result is written to
`$LORAFORGE_HOME/models/gguf-<sha256[:16]>/` with `loraforge-gguf.json` naming the source file and its
sha256. The folder's weights are the de-quantized ones, so its fingerprint is theirs, not the original
release's: an adapter trained on the GGUF is an adapter for that GGUF.

Checked before anything is loaded: the magic bytes, that the metadata and tensor table parse and the
tensors lie inside the file (a truncated download), and that transformers can read the architecture.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraforge import paths
from loraforge.errors import ConfigError, NotFound

MAGIC = b"GGUF"
MANIFEST = "loraforge-gguf.json"
# Above this many parameters the de-quantized copy is kept in bfloat16 (half the disk and memory of
# float32); the rounding is far below the quantization error the GGUF already carries.
FLOAT32_UP_TO = 2_000_000_000


@dataclass(frozen=True)
class GgufInfo:
    """What the file's metadata says, read without de-quantizing anything."""

    path: Path
    architecture: str
    name: str | None
    tensor_types: tuple[str, ...]
    parameters: int
    context_length: int | None
    has_chat_template: bool


def _field(reader, key: str):
    from transformers.modeling_gguf_pytorch_utils import read_field

    value = read_field(reader, key) if key in reader.fields else []
    return value[0] if value else None


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # sections, not architectures


def inspect(path: Path) -> GgufInfo:
    """Read and check a GGUF file's header and tensor table. Raises ConfigError naming what is wrong."""
    where = f"GGUF file {path.name!r}"
    if not path.is_file():
        raise NotFound(f"{where} does not exist", field="model_name")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != MAGIC:
        raise ConfigError(f"{where} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}", field="model_name")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        architecture = _field(reader, "general.architecture")
        tensors = list(reader.tensors)
    except Exception as exc:  # the reader fails in many ways on a cut file: all mean the same to the user
        raise ConfigError(f"{where} is damaged or truncated: its metadata or tensor table cannot be read "
                          f"({type(exc).__name__})", field="model_name") from None
    size = path.stat().st_size
    if not tensors or any(int(t.data_offset) + int(t.n_bytes) > size for t in tensors):
        raise ConfigError(f"{where} is truncated: its tensors extend past the end of the file ({size:,} bytes)",
                          field="model_name")
    if not architecture:
        raise ConfigError(f"{where} has no general.architecture in its metadata", field="model_name")
    supported = supported_architectures()
    normalized = architecture.replace("-", "_")
    if architecture not in supported and normalized not in supported and not any(
            architecture.startswith(s) for s in ("qwen2moe", "qwen3moe")):
        raise ConfigError(f"{where}: architecture {architecture!r} cannot be read from GGUF by transformers; "
                          f"supported: {', '.join(supported)}", field="model_name")
    context = _field(reader, f"{architecture}.context_length")
    return GgufInfo(path=path, architecture=architecture, name=_field(reader, "general.name"),
                    tensor_types=tuple(sorted({t.tensor_type.name for t in tensors})),
                    parameters=sum(int(t.n_elements) for t in tensors),
                    context_length=int(context) if context is not None else None,
                    has_chat_template="tokenizer.chat_template" in reader.fields)


def file_sha256(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def _index_path() -> Path:
    return paths.home() / "models" / "gguf-index.json"


def _index_key(path: Path) -> str:
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def cached_folder(path: Path) -> Path | None:
    """The converted folder of this file, if it was converted before (looked up without hashing)."""
    try:
        index = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return None
    entry = index.get(_index_key(path.resolve()))
    if not isinstance(entry, str) or not entry.startswith("gguf-") or not entry[5:].isalnum():
        return None
    folder = paths.inside(paths.home() / "models", entry)
    return folder if (folder / MANIFEST).is_file() else None


def _remember(path: Path, folder: Path) -> None:
    index_file = _index_path()
    try:
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    index[_index_key(path.resolve())] = folder.name
    paths.atomic_write_json(index_file, index)


def import_gguf(path: Path, *, expected_sha256: str | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Convert a GGUF file into a cached safetensors folder (once) and return the folder.

    `expected_sha256` (an Ollama blob's digest) is checked against the file's. `progress(phase, done,
    total)` reports "hashing" (bytes) and "converting" (0/1, then 1/1).
    """
    path = Path(path).expanduser().resolve()
    if (folder := cached_folder(path)) is not None:
        return folder
    info = inspect(path)
    sha = file_sha256(path, (lambda done, total: progress("hashing", done, total)) if progress else None)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ConfigError(f"GGUF file {path.name!r} does not match its digest sha256:{expected_sha256[:12]}… "
                          "(damaged or replaced)", field="model_name")
    final = paths.inside(paths.home() / "models", f"gguf-{sha[:16]}")  # resolved, as cached_folder gives it
    if (final / MANIFEST).is_file():
        _remember(path, final)
        return final
    if progress:
        progress("converting", 0, 1)
    started = time.perf_counter()
    tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        dtype = _convert(info, tmp)
        paths.atomic_write_json(tmp / MANIFEST, {
            "source": {"file": path.name, "sha256": sha, "bytes": path.stat().st_size},
            "architecture": info.architecture, "name": info.name, "tensor_types": list(info.tensor_types),
            "parameters": info.parameters, "dtype": dtype,
            "convert_seconds": round(time.perf_counter() - started, 1),
        })
        try:
            paths.publish_dir(tmp, final)
        except OSError:  # another process converted the same file first: keep its copy
            paths.remove_tree(tmp)
    except BaseException:
        paths.remove_tree(tmp)
        raise
    _remember(path, final)
    if progress:
        progress("converting", 1, 1)
    return final


def _convert(info: GgufInfo, out: Path) -> str:
    """De-quantize with transformers and write config, safetensors weights, tokenizer and template."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if info.parameters <= FLOAT32_UP_TO else torch.bfloat16
    folder, name = str(info.path.parent), info.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ConfigError(f"GGUF file {name!r} ({info.architecture}) could not be converted: "
                          f"{str(exc).splitlines()[0][:200]}", field="model_name") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the folder holds plain de-quantized weights
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, and it is the embedding
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    del model
    return str(dtype).removeprefix("torch.")


def package_gguf(module: str, file: str) -> Path | None:
    """The GGUF file shipped inside an installed Python package, found without importing the package."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    candidate = Path(spec.origin).parent / file
    return candidate if candidate.is_file() else None


