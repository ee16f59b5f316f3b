"""Knowledge evaluations over HTTP: run a suite on a base model or an adapter, read stored reports."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from loraforge.evals.service import DEFAULT_MAX_TOKENS, evaluate
from loraforge.evals.suite import resolve_suite

router = APIRouter(tags=["evaluations"])


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    suite: dict[str, Any] | str = Field(description="an inline suite, or a file name in the store's suites folder")
    model: str | None = Field(default=None, description="base model (default: the adapter's own base)")
    adapter: str | None = Field(default=None, description="NAME or NAME@vN")
    compare: Literal["base"] | None = None
    samples: int = Field(default=1, ge=1, le=64)
    k: int | None = Field(default=None, ge=1, le=64)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=4096)
    seed: int | None = 0
    scope: Literal["all", "near"] | None = Field(default=None, description="override the adapter's scope (default: "
                                                 "its own, as it is served)")


@router.post("/api/evals/run")
def run_eval(body: EvalRequest, request: Request):
    """Score the suite now (greedy by default) and keep the report with the adapter version it tested."""
    store = request.app.state.store
    suite = resolve_suite(body.suite, store.root / "suites", field="suite")
    if body.model is not None:
        request.app.state.engine.check_model(body.model)
    return evaluate(request.app.state.engine, store, suite, model=body.model, adapter=body.adapter,
                    compare_base=body.compare == "base", samples=body.samples, k=body.k or body.samples,
                    temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_tokens, seed=body.seed,
                    scope=body.scope)


@router.get("/api/suites")
def list_suites(request: Request):
    """Suite files in the store's suites folder (names for `suite` in /api/evals/run)."""
    folder = request.app.state.store.root / "suites"
    names = sorted(p.name for p in folder.glob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file()) \
        if folder.is_dir() else []
    return {"suites": names}


@router.get("/api/evals/{eval_id}")
def get_eval(eval_id: str, request: Request):
    return request.app.state.store.eval_report(eval_id)
