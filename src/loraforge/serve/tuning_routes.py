"""Tuning over HTTP: start a study as a job, then read its trials so far and the best one."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loraforge import paths
from loraforge.errors import LoraforgeError, NotFound
from loraforge.tune.spec import parse_tune_spec

router = APIRouter(tags=["tuning"])


@router.post("/api/tuning/start", status_code=202)
async def start_tuning(request: Request):
    """Queue a tuning job. Body: a tuning spec (as `loraforge tune` takes it, the seed's sweep space too).
    A `dataset` is a file name in the store's data folder and a `suite` one in its suites folder; the
    study is stored in the server's home (a shared `storage` is for `loraforge tune` on the command line)."""
    store, queue = request.app.state.store, request.app.state.queue
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise LoraforgeError("body is not valid JSON", field="body") from None
    if isinstance(raw, dict) and "storage" in raw:
        raise LoraforgeError("storage: a shared study database is set up with `loraforge tune --storage`, not over "
                             "HTTP", field="storage")
    spec = parse_tune_spec(raw, source="body")
    for model in [spec.model, *(spec.space.model or [])]:
        request.app.state.engine.check_model(model)
    if spec.dataset:  # the files must already be in the store; relative to its root from here on
        paths.inside(store.root / "data", spec.dataset, what="dataset", field="dataset")
        paths.inside(store.root / "suites", spec.suite, what="suite", field="suite")
        spec = spec.model_copy(update={"dataset": f"data/{spec.dataset}", "suite": f"suites/{spec.suite}"})
        for field, rel in (("dataset", spec.dataset), ("suite", spec.suite)):
            if not (store.root / rel).is_file():
                raise NotFound(f"{field} {rel.split('/', 1)[1]!r} not found in the store's {rel.split('/')[0]} folder",
                               field=field)
    job = queue.submit(adapter=spec.name, spec=spec.model_dump(mode="json"), records=[],
                       device=request.app.state.engine.placement.device, kind="tune")
    return JSONResponse(status_code=202, content={"job_id": job.id, "status": job.status, "kind": "tune",
                                                  "study": spec.name})


@router.get("/api/tuning/{job_id}")
def tuning_status(job_id: str, request: Request):
    """The job, every trial finished so far (results.jsonl rows, in order) and the best per study."""
    queue = request.app.state.queue
    job = queue.get(job_id)
    if job.kind != "tune":
        raise NotFound(f"job {job_id} is not a tuning job")
    events = queue.events_after(job_id, 0)
    trials = [data for _id, type_, data in events if type_ == "trial"]
    summaries = [data for _id, type_, data in events if type_ == "summary"]
    best: dict[str, dict] = {}
    for row in trials:
        if row.get("state") == "complete" and (row["study"] not in best or row["accuracy"] > best[row["study"]]["accuracy"]):
            best[row["study"]] = row
    return {**job.public(), "trials": trials, "best": best, "summaries": summaries}
