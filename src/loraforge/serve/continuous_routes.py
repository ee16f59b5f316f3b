"""Continuous updates over HTTP: queue an update job, read an adapter's history, roll back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from loraforge import paths
from loraforge.continuous import UpdateOptions, history, queue_update
from loraforge.data import is_file_list, load_examples, load_examples_from_file, load_examples_from_files
from loraforge.errors import LoraforgeError
from loraforge.evals.gate import GatePolicy
from loraforge.evals.suite import resolve_suite
from loraforge.names import check_name

router = APIRouter(tags=["continuous updates"])


class UpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    training_data: list[Any] | str = Field(description="records inline, or file name(s) in the store's data folder")
    suite: dict[str, Any] | str | None = Field(default=None, description="suite of the new knowledge: inline, "
                                                                          "or a file in the store's suites folder")
    replay_ratio: float = Field(default=1.0, ge=0, le=100)
    min_efficacy: float = Field(default=0.9, ge=0, le=1)
    min_generalization: float = Field(default=0.0, ge=0, le=1)
    tolerance: float = Field(default=0.05, ge=0, le=1)
    guard_generalization: bool = False
    keep: int | None = Field(default=None, ge=1)
    num_epochs: float | None = Field(default=None, gt=0, le=100000)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    seed: int = Field(default=0, ge=0)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | int | None = Field(default=None, description="version to activate (vN or N); default the parent")


@router.post("/api/adapters/{name}/update", status_code=202)
def start_update(name: str, body: UpdateRequest, request: Request):
    """Queue an update of NAME's active version: train, run every lineage suite, promote or reject."""
    store, queue = request.app.state.store, request.app.state.queue
    check_name(name, "adapter")
    store.get(name)  # 404 when there is no active version to update
    data_root = store.root / "data"
    if isinstance(body.training_data, str):
        examples = load_examples_from_file(paths.inside(data_root, body.training_data))
    elif is_file_list(body.training_data):
        examples = load_examples_from_files([paths.inside(data_root, f) for f in body.training_data])
    else:
        examples = load_examples(body.training_data, "training_data")
    suite = resolve_suite(body.suite, store.root / "suites", field="suite") if body.suite is not None else None
    options = UpdateOptions(replay_ratio=body.replay_ratio, seed=body.seed, keep=body.keep,
                            num_epochs=body.num_epochs, learning_rate=body.learning_rate,
                            policy=GatePolicy(body.min_efficacy, body.min_generalization, body.tolerance,
                                              ("efficacy", "retention")
                                              + (("generalization",) if body.guard_generalization else ())))
    job = queue_update(queue, name, examples, suite, options, request.app.state.engine.placement.device)
    return JSONResponse(status_code=202, content={"job_id": job.id, "status": job.status, "adapter": name,
                                                  "kind": "update"})


@router.get("/api/adapters/{name}/history")
def adapter_history(name: str, request: Request):
    check_name(name, "adapter")
    return history(request.app.state.store, name)


@router.post("/api/adapters/{name}/rollback")
def rollback(name: str, request: Request, body: RollbackRequest | None = None):
    """Serve an earlier version again; a running server switches on its next request."""
    check_name(name, "adapter")
    to = (body.to if body else None)
    if isinstance(to, str):
        if not to.lstrip("v").isdigit():
            raise LoraforgeError(f"to must be a version like v2, not {to!r}", field="to")
        to = int(to.lstrip("v"))
    version = request.app.state.store.rollback(name, to)
    return {"adapter": name, "active": version.ref}
