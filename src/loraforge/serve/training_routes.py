"""Training endpoints (the seed's paths): start a job, list, show, stream progress, cancel, resume."""

from __future__ import annotations

import json
import time
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraforge import paths
from loraforge.config import parse_train_config
from loraforge.data import is_file_list, load_examples, load_examples_from_file, load_examples_from_files, parse_records
from loraforge.errors import ConfigError, DataError, LoraforgeError, InsufficientMemory
from loraforge.jobs import TERMINAL
from loraforge.train.plan import plan_training

router = APIRouter(tags=["training"])


async def _read_start_body(request: Request) -> tuple[dict, list | None, str]:
    """A JSON config, or multipart with `config` (JSON) and an uploaded `training_data` file."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        config_field = form.get("config")
        if config_field is None:
            raise LoraforgeError("multipart body needs a 'config' part (JSON)", field="config")
        text = (await config_field.read()).decode("utf-8") if hasattr(config_field, "read") else str(config_field)
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise LoraforgeError("config part is not valid JSON", field="config") from None
        upload = form.get("training_data")
        records = None
        source = "upload"
        if upload is not None and hasattr(upload, "read"):
            source = upload.filename or "upload"
            data = await upload.read()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise DataError(f"{source}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
            records = parse_records(text, source)
        return raw, records, source
    body = await request.body()
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise LoraforgeError("body is not valid JSON", field="body") from None
    return raw, None, "body"


@router.post("/api/training/start", status_code=202)
async def start_training(request: Request):
    """Queue a training job. Body: a seed-style config with data inline (`training_data`: list), as a
    file name inside the store's data folder (`training_data`: "file.jsonl"), or uploaded (multipart)."""
    store = request.app.state.store
    queue = request.app.state.queue
    raw, uploaded, source = await _read_start_body(request)
    if not isinstance(raw, dict):
        raise LoraforgeError("body must be a JSON object (a training config)", field="body")
    spec = parse_train_config(raw, source="request")
    request.app.state.engine.check_model(spec.model_name)
    if spec.trust_remote_code:
        raise LoraforgeError("trust_remote_code runs Python from the model's folder: refused over HTTP; train "
                             "that model with `loraforge train CONFIG --trust-remote-code`", field="trust_remote_code")
    if spec.eval_suite is not None:  # inline, or a file in the store's suites folder
        from loraforge.evals.suite import resolve_suite

        suite = resolve_suite(spec.eval_suite, store.root / "suites")
        spec = spec.model_copy(update={"eval_suite": suite.model_dump(mode="json")})
    anchors = spec.training.retention_anchors
    if anchors != "builtin":  # a file in the store's data folder, like training_data
        path = paths.inside(store.root / "data", anchors, what="retention_anchors", field="retention_anchors")
        if not path.is_file():
            raise ConfigError(f"retention_anchors {anchors!r} is not a file in the store's data folder",
                              field="retention_anchors")
        resolved = str(path)
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"retention_anchors": resolved})})
    if uploaded is not None:
        examples = load_examples(uploaded, source)
    elif is_file_list(spec.training_data):
        data_root = store.root / "data"
        examples = load_examples_from_files([paths.inside(data_root, f) for f in spec.training_data])
    elif isinstance(spec.training_data, list):
        examples = load_examples(spec.training_data, "training_data")
    elif isinstance(spec.training_data, str):
        data_root = store.root / "data"
        examples = load_examples_from_file(paths.inside(data_root, spec.training_data))
    else:
        raise LoraforgeError("no training data: put records in training_data, name a file in the store's data "
                             "folder, or upload one", field="training_data")
    plan = plan_training(spec)  # every model-dependent check before the job is queued
    from loraforge.train.estimate import refusal, tokenized

    if (why := refusal(plan, tokenized(plan, examples))) is not None:  # before a worker loads anything
        raise InsufficientMemory(why, field="force")
    stored = plan.spec.model_copy(update={"training_data": None})
    job = queue.submit(adapter=spec.name, spec=stored.model_dump(mode="json"),
                       records=[{"messages": e.messages} for e in examples],
                       device=request.app.state.engine.placement.device)
    return JSONResponse(status_code=202, content={"job_id": job.id, "status": job.status, "adapter": job.adapter,
                                                  "notes": list(plan.spec.notes)})


@router.get("/api/training/jobs")
def list_jobs(request: Request):
    return {"jobs": [j.public() for j in request.app.state.queue.list()]}


@router.get("/api/training/jobs/{job_id}")
def get_job(job_id: str, request: Request):
    return request.app.state.queue.get(job_id).public()


@router.post("/api/training/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request):
    return request.app.state.queue.cancel(job_id).public()


@router.post("/api/training/jobs/{job_id}/resume")
def resume_job(job_id: str, request: Request):
    return request.app.state.queue.resume(job_id).public()


@router.get("/api/training/jobs/{job_id}/events")
def job_events(job_id: str, request: Request):
    """Server-Sent Events: every progress/log/state event, replayed after `Last-Event-ID`."""
    queue = request.app.state.queue
    queue.get(job_id)  # 404 before the stream starts
    header = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "0"
    try:
        last = int(header)
    except ValueError:
        raise LoraforgeError("Last-Event-ID must be an integer", field="Last-Event-ID") from None

    def stream():
        nonlocal last
        idle_since = time.monotonic()
        while True:
            events = queue.events_after(job_id, last)
            for event_id, type_, data in events:
                last = event_id
                yield f"id: {event_id}\nevent: {type_}\ndata: {json.dumps(data)}\n\n"
            if events:
                idle_since = time.monotonic()
            if queue.get(job_id).status in TERMINAL and not queue.events_after(job_id, last):
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - idle_since > 15:
                yield ": keep-alive\n\n"
                idle_since = time.monotonic()
            time.sleep(0.25)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


