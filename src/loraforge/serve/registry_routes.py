"""Models and adapters (the seed's paths): list, show, load, unload, delete; export."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from loraforge import paths
from loraforge.errors import Conflict
from loraforge.models.resolve import available_models
from loraforge.names import check_name, parse_ref

router = APIRouter(tags=["models and adapters"])


@router.get("/api/models")
def list_models(request: Request):
    engine = request.app.state.engine
    loaded = {b.requested: b for b in engine.bases.values()}
    models = [{**row, "loaded": row["id"] in loaded} for row in available_models()]
    models += [{"id": name, "source": "local", "ready": True, "status": "loaded", "loaded": True}
               for name in loaded if name not in {row["id"] for row in models}]
    return {"models": models}


@router.get("/api/serving")
def serving(request: Request):
    """Each loaded base: requests generating and waiting, the limits, and counters of what was served
    (decode steps, rows decoded, largest batch: how much continuous batching happened)."""
    engine = request.app.state.engine
    return {"bases": [{"model": b.requested, "id": b.id, "device": b.device, "precision": b.precision,
                       "adapters": sorted(b.adapters), **b.scheduler.load()} for b in list(engine.bases.values())]}


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=300, description="a catalog model shipped as GGUF, ollama:NAME[:TAG], "
                                                                  "or a .gguf file name in the store's data folder")


@router.post("/api/models/import")
def import_model(body: ImportBody, request: Request):
    """Convert a GGUF model once (as `loraforge models import`); file paths are kept inside data/."""
    from loraforge.errors import ConfigError
    from loraforge.models import gguf, resolve_base_model
    from loraforge.models.resolve import gguf_source

    source = body.source
    if source.lower().endswith(".gguf"):
        source = str(paths.inside(request.app.state.store.root / "data", source, what="source", field="source"))
    found = gguf_source(resolve_base_model(source))
    if found is None:
        raise ConfigError(f"source {body.source!r} is not a GGUF model (a .gguf file in data/, ollama:NAME, or a catalog "
                          "model shipped as GGUF)", field="source")
    folder = gguf.import_gguf(found[0], expected_sha256=found[1])
    import json as _json

    info = _json.loads((folder / gguf.MANIFEST).read_text())
    return {"source": body.source, "architecture": info["architecture"], "parameters": info["parameters"],
            "dtype": info["dtype"], "sha256": info["source"]["sha256"], "ready": True}


@router.post("/api/models/{model_id:path}/load")
def load_model(model_id: str, request: Request):
    request.app.state.engine.check_model(model_id)
    base = request.app.state.engine.load_base(model_id)
    return {"model": model_id, "id": base.id, "loaded": True, "device": base.device}


@router.post("/api/models/{model_id:path}/unload")
def unload_model(model_id: str, request: Request):
    return {"model": model_id, "unloaded": request.app.state.engine.unload_base(model_id)}


@router.get("/api/adapters")
def list_adapters(request: Request):
    store = request.app.state.store
    loaded = request.app.state.engine.loaded_adapters()
    out = []
    for row in store.list():
        out.append({"name": row["name"], "active_version": row["active_version"], "versions": row["versions"],
                    "loaded_versions": sorted(k for k in loaded if k.split("@")[0] == row["name"])})
    return {"adapters": out}


@router.get("/api/adapters/{name:path}")
def show_adapter(name: str, request: Request):
    ref = parse_ref(name)
    store = request.app.state.store
    versions = store.versions(ref.name)
    if not versions:
        store.get(ref)  # raises a 404 naming the adapter
    if ref.version is not None:
        return {**store.get(ref).public(), "evals": store.evals(ref.name, ref.version)}
    active = next((v.version for v in versions if v.status == "active"), None)
    evals = store.evals(ref.name)
    return {"name": ref.name, "active_version": active,
            "versions": [{**v.public(), "evals": [e for e in evals if e["ref"] == v.ref]} for v in versions]}


@router.post("/api/adapters/{name:path}/load")
def load_adapter(name: str, request: Request):
    base, version = request.app.state.engine.load_adapter(name)
    return {"adapter": version.ref, "base_model": base.requested, "loaded": True}


@router.post("/api/adapters/{name:path}/unload")
def unload_adapter(name: str, request: Request):
    parse_ref(name)
    return {"adapter": name, "unloaded": request.app.state.engine.unload_adapter(name)}


class ExportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["peft", "merged", "gguf", "ollama", "vllm"]
    dir: str = Field(description="output folder, inside the store's exports/ folder")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


@router.post("/api/adapters/{name:path}/export")
def export(name: str, body: ExportBody, request: Request):
    """Write the adapter in a runtime's format into `$LORAFORGE_HOME/exports/DIR`."""
    from loraforge.export import export_adapter

    parse_ref(name)
    store = request.app.state.store
    target = paths.inside(store.root / "exports", body.dir, what="dir", field="dir")
    result = export_adapter(store, name, body.format, target, dtype=body.dtype)
    return {**result, "dir": target.relative_to(store.root.resolve()).as_posix()}


@router.delete("/api/adapters/{name:path}")
def delete_adapter(name: str, request: Request):
    check_name(name, "adapter")
    queue = request.app.state.queue
    if any(j.adapter == name and j.status in ("queued", "running") for j in queue.list(1000)):
        raise Conflict(f"adapter {name!r} has a training job queued or running", field="adapter")
    removed = request.app.state.engine.delete_adapter(name)
    return {"adapter": name, "deleted_versions": removed}
