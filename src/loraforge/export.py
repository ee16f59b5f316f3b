"""Adapters out of the store, in the form the user's runtime takes.

- `peft`: the version's folder as stored (verified copy).
- `merged`: the base with the adapter merged in, a safetensors Hugging Face folder with tokenizer and
  chat template.
- `gguf`: the LoRA as a llama.cpp LoRA adapter file (`general.type = adapter`, `adapter.type = lora`,
  `adapter.lora.alpha`; tensors `<base tensor>.lora_a` / `.lora_b` in PEFT's shapes, which are the
  transposed layout llama.cpp expects). llama.cpp stores Llama's q/k projections with their rows
  permuted for its rotary layout; B's rows (the output side) are permuted the same way.
- `ollama`: the GGUF adapter and a Modelfile (`FROM` the base, `ADAPTER`, `TEMPLATE`, stops) with the
  `ollama create` command.
- `vllm`: the PEFT folder after the checks vLLM applies (no `modules_to_save`, supported targets,
  rank within vLLM's allowed `--max-lora-rank` values), with the `vllm serve` line.

Every export is written into a fresh temporary folder next to the target and renamed into place.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import uuid
from pathlib import Path

from loraforge import paths
from loraforge.errors import ConfigError
from loraforge.models import resolve_base_model
from loraforge.models.resolve import gguf_source, model_folder
from loraforge.store import Store

FORMATS = ("peft", "merged", "gguf", "ollama", "vllm")
# transformers model_type -> (GGUF architecture, whether q/k rows are permuted as llama.cpp's Llama stores them)
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
              "qwen3": ("qwen3", False)}
VLLM_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def export_adapter(store: Store, ref: str, fmt: str, target: Path, *, dtype: str | None = None) -> dict:
    """Write `ref` as `fmt` into `target` (absent or an empty folder); returns what was written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}", field="format")
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise ConfigError("dtype must be float32, float16 or bfloat16", field="dtype")
    version = store.get(ref)
    source = store.verify(version)
    target = Path(target).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"dir {target.name!r} exists and is not an empty folder; choose a new one", field="dir")
    base_name = version.config.get("model_name") or version.base_model
    adapter_config = json.loads((source / "adapter_config.json").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        notes: dict = {}
        if fmt == "peft":
            for file in source.iterdir():
                shutil.copyfile(file, tmp / file.name)
        elif fmt == "merged":
            _merged(base_name, source, tmp, dtype)
        elif fmt == "gguf":
            notes = _gguf(base_name, source, adapter_config, tmp / "adapter.gguf", dtype)
        elif fmt == "ollama":
            notes = _gguf(base_name, source, adapter_config, tmp / "adapter.gguf", dtype)
            notes.update(_ollama(base_name, version.name, tmp))
        else:
            notes = _vllm(version.name, base_name, source, adapter_config, tmp, target)
        try:
            if target.exists():
                try:
                    target.rmdir()  # the empty folder checked above; another export may have filled it since
                except FileNotFoundError:
                    pass
            paths.publish_dir(tmp, target)
        except OSError as exc:  # a concurrent export to the same folder won the race
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise ConfigError(f"dir {target.name!r} exists and is not an empty folder; choose a new one",
                              field="dir") from None
    except BaseException:
        paths.remove_tree(tmp)
        raise
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file()}
    return {"adapter": version.ref, "format": fmt, "dir": str(target), "files": files,
            "bytes": sum(files.values()), **notes}


# ---- merged ------------------------------------------------------------------------------------------------
def _merged(base_name: str, source: Path, out: Path, dtype: str | None) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(resolve_base_model(base_name))
    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)


# ---- GGUF (llama.cpp LoRA) ---------------------------------------------------------------------------------
def _base_config(base_name: str) -> dict:
    return json.loads((Path(model_folder(resolve_base_model(base_name))) / "config.json").read_text())


def _permute_rows(weight, n_head: int):
    """llama.cpp's Llama q/k row order: within each head, the two rotary halves interleaved."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf(base_name: str, source: Path, adapter_config: dict, out: Path, dtype: str | None) -> dict:
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    config = _base_config(base_name)
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise ConfigError(f"GGUF export supports {', '.join(sorted(GGUF_ARCHS))} models; this base is "
                          f"{model_type!r}", field="format")
    if adapter_config.get("modules_to_save"):
        raise ConfigError("GGUF LoRA cannot carry modules_to_save (whole trained modules); export merged instead",
                          field="format")
    if adapter_config.get("use_dora"):
        raise ConfigError("GGUF LoRA cannot carry DoRA; export merged instead", field="format")
    arch, permuted = GGUF_ARCHS[model_type]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    r = int(adapter_config["r"])
    alpha = float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= math.sqrt(r)  # llama.cpp scales by alpha / r; rsLoRA means alpha / sqrt(r)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    weights = load_file(str(source / "adapter_model.safetensors"))
    np_dtype = np.float16 if dtype == "float16" else np.float32
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    count = 0
    for key in sorted(weights):
        match = _KEY.match(key)
        if match is None:
            raise ConfigError(f"adapter tensor {key!r} is not a LoRA A/B weight llama.cpp can take", field="format")
        module, ab = match["module"], match["ab"]
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None or module.endswith("embed_tokens"):
            raise ConfigError(f"llama.cpp has no tensor for {module!r}", field="format")
        tensor = weights[key].float()
        if ab == "B" and permuted and module.endswith(("q_proj", "k_proj")):
            tensor = _permute_rows(tensor, n_head if module.endswith("q_proj") else n_kv)
        writer.add_tensor(f"{gguf_name}.lora_{ab.lower()}", tensor.numpy().astype(np_dtype))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"gguf_architecture": arch, "tensors": count, "lora_alpha": alpha}


# ---- Ollama ------------------------------------------------------------------------------------------------
def _go_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """The chat template in Ollama's Go syntax, for the two families a small model here uses."""
    if chat_template and "<|im_start|>" in chat_template:
        return ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                '<|im_start|>assistant\n', ["<|im_start|>", "<|im_end|>"])
    if chat_template and "<|start_header_id|>" in chat_template:
        return ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
                '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
                '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
                ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    return None, []


def _ollama(base_name: str, name: str, out: Path) -> dict:
    ref = resolve_base_model(base_name)
    folder = Path(model_folder(ref))
    template_file = folder / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else None
    if chat_template is None and (folder / "tokenizer_config.json").is_file():
        chat_template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    source = gguf_source(ref)
    if base_name.startswith("ollama:"):
        base_line = base_name.split(":", 1)[1]  # the model Ollama already has; its template is inherited
    elif source is not None:
        base_line = str(source[0])  # the GGUF file this base was converted from
    else:
        raise ConfigError(f"Ollama needs the base as GGUF: {base_name!r} is a Hugging Face model; convert it "
                          "with llama.cpp's convert_hf_to_gguf.py and use that file as FROM", field="format")
    template, stops = _go_template(chat_template)
    lines = [f"FROM {base_line}", "ADAPTER ./adapter.gguf"]
    if template and not base_name.startswith("ollama:"):
        lines.append(f'TEMPLATE """{template}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    (out / "Modelfile").write_text("\n".join(lines) + "\n")
    command = f"ollama create {name} -f Modelfile"
    (out / "README.txt").write_text(f"In this folder: {command}\nThen: ollama run {name}\n")
    return {"command": command, "template": "converted" if template else "inherited from the base"}


# ---- vLLM --------------------------------------------------------------------------------------------------
def _vllm(name: str, base_name: str, source: Path, adapter_config: dict, out: Path, target: Path) -> dict:
    if adapter_config.get("modules_to_save"):
        raise ConfigError(f"vLLM refuses adapters with modules_to_save ({adapter_config['modules_to_save']}); "
                          "train without them or export merged", field="format")
    if adapter_config.get("use_dora"):
        raise ConfigError("vLLM does not serve DoRA adapters; export merged", field="format")
    targets = set(adapter_config.get("target_modules") or [])
    unsupported = sorted(targets - VLLM_TARGETS)
    if unsupported:
        raise ConfigError(f"vLLM LoRA does not take target modules {unsupported}; supported: "
                          f"{', '.join(sorted(VLLM_TARGETS))}", field="format")
    r = int(adapter_config["r"])
    max_rank = next((v for v in VLLM_RANKS if v >= r), None)
    if max_rank is None:
        raise ConfigError(f"rank {r} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})", field="format")
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(source / file, out / file)
    model_id = resolve_base_model(base_name).id
    command = f"vllm serve {model_id} --enable-lora --max-lora-rank {max_rank} --lora-modules {name}={target}"
    (out / "README.txt").write_text(command + "\n")
    return {"command": command, "max_lora_rank": max_rank}
