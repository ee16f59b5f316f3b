"""Ollama model references (`ollama:llama3.2:1b`) resolved offline to the GGUF blob Ollama stored.

Ollama keeps `manifests/<host>/<namespace>/<model>/<tag>` (JSON) and `blobs/sha256-<hex>` under its
models folder (`OLLAMA_MODELS`, default `~/.ollama/models`). The manifest's layer of media type
`application/vnd.ollama.image.model` is the GGUF. Every part of the reference and the digest read from
the manifest are checked against a strict pattern before a path is built from them, and each path is
kept inside the models folder (symlinks resolved).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from loraforge import paths
from loraforge.errors import ConfigError, NotFound

PREFIX = "ollama:"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
MODEL_LAYER = "application/vnd.ollama.image.model"
_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_HOST = re.compile(r"^[a-z0-9][a-z0-9.-]{0,252}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class OllamaRef:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.model}:{self.tag}" if (self.host, self.namespace) == (
            DEFAULT_HOST, DEFAULT_NAMESPACE) else f"{PREFIX}{self.host}/{self.namespace}/{self.model}:{self.tag}"


def models_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _bad(text: str, why: str) -> ConfigError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return ConfigError(f"invalid Ollama reference {shown!r}: {why}", field="model_name")


def parse(text: str) -> OllamaRef:
    """`ollama:[host/][namespace/]model[:tag]`, tag defaulting to `latest`."""
    if not text.startswith(PREFIX):
        raise _bad(text, f"must start with {PREFIX!r}")
    rest = text[len(PREFIX):]
    name, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    parts = name.split("/")
    if not 1 <= len(parts) <= 3:
        raise _bad(text, "use model[:tag], namespace/model[:tag] or host/namespace/model[:tag]")
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    for part, pattern, what in ((host, _HOST, "host"), (namespace, _PART, "namespace"), (model, _PART, "model"),
                                (tag, _TAG, "tag")):
        if not pattern.fullmatch(part) or ".." in part:
            raise _bad(text, f"the {what} {part!r} is not a valid Ollama name")
    return OllamaRef(host, namespace, model, tag)


def resolve_blob(ref: OllamaRef, root: Path | None = None) -> tuple[Path, str]:
    """(path of the model's GGUF blob, its sha256 hex) from Ollama's local manifest."""
    root = (root or models_root()).resolve()
    manifest_path = paths.inside(root, "manifests", ref.host, ref.namespace, ref.model, ref.tag,
                                 what="Ollama manifest", field="model_name", error=ConfigError)
    if not manifest_path.is_file():
        raise NotFound(f"Ollama model {ref} is not in {root} (no manifest); run `ollama pull "
                       f"{str(ref)[len(PREFIX):]}` first, or set OLLAMA_MODELS", field="model_name")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        layers = [layer for layer in manifest["layers"] if layer.get("mediaType") == MODEL_LAYER]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"the Ollama manifest of {ref} is not valid JSON with layers", field="model_name") from None
    if len(layers) != 1:
        raise ConfigError(f"the Ollama manifest of {ref} has {len(layers)} model layers, expected 1",
                          field="model_name")
    digest = layers[0].get("digest")
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ConfigError(f"the Ollama manifest of {ref} names an invalid digest", field="model_name")
    blob = paths.inside(root, "blobs", f"sha256-{match.group(1)}", what="Ollama blob", field="model_name",
                        error=ConfigError)
    if not blob.is_file():
        raise NotFound(f"the GGUF blob of Ollama model {ref} is missing from {root / 'blobs'}", field="model_name")
    return blob, match.group(1)
