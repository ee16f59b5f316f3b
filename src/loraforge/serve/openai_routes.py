"""OpenAI-compatible endpoints: `model` picks a base model, an adapter or `adapter@vN` per request."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraforge.models.resolve import TINY
from loraforge.serve.protocol import ChatCompletionRequest

router = APIRouter(tags=["openai"])


@router.get("/v1/models")
def models(request: Request):
    store = request.app.state.store
    engine = request.app.state.engine
    created = int(time.time())
    bases = {TINY} | {b.requested for b in engine.bases.values()}
    data = []
    for row in store.list():
        for version in store.versions(row["name"]):
            parent = version.config.get("model_name") or version.base_model
            bases.add(parent)
            entry = {"id": version.ref, "object": "model", "created": created, "owned_by": "loraforge",
                     "parent": parent, "root": parent, "status": version.status}
            data.append(entry)
            if version.status == "active":
                data.append({**entry, "id": row["name"]})
    data = [{"id": b, "object": "model", "created": created, "owned_by": "loraforge", "parent": None, "root": b}
            for b in sorted(bases)] + data
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Queued on the model's decode loop (batched with every other request on that base). A client that
    disconnects, streaming or waiting, frees its place at the next step."""
    from starlette.concurrency import run_in_threadpool

    from loraforge.engine import Channel, SamplingParams

    engine = request.app.state.engine
    messages = [m.model_dump() for m in body.messages]
    params = SamplingParams(temperature=body.temperature, top_p=body.top_p,
                            max_tokens=body.max_completion_tokens or body.max_tokens or 128,
                            stop=tuple(body.stop or ()), seed=body.seed, logprobs=body.logprobs,
                            top_logprobs=body.top_logprobs or 0, ignore_eos=body.ignore_eos)
    channel = Channel(asyncio.get_running_loop())
    # resolving may load a base or an adapter (seconds): off the event loop. Errors are 4xx before any byte.
    pending, shown = await run_in_threadpool(lambda: engine.request(body.model, messages, params, channel,
                                                                    scope=body.scope))
    headers = answered_headers(pending.routing, shown)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        try:
            result = await _result(channel, request)
        finally:
            pending.cancel()  # a no-op once done; frees the row if the client left
        if result is None:
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(headers=headers, content={
            "id": completion_id, "object": "chat.completion", "created": created, "model": shown,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text.strip()},
                         "finish_reason": result.finish_reason,
                         "logprobs": {"content": result.logprobs} if body.logprobs else None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
            **({"loraforge": pending.routing} if pending.routing else {}),
        })

    def chunk(delta: dict, finish: str | None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": shown,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(payload)}\n\n"

    async def stream():
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            while True:
                kind, payload = await channel.aget()
                if kind == "delta":
                    yield chunk({"content": payload}, None)
                elif kind == "done":
                    yield chunk({}, payload.finish_reason)
                    yield "data: [DONE]\n\n"
                    return
                else:
                    error = {"message": "generation failed", "type": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
        finally:  # the client went away (the task is cancelled) or the answer is complete
            pending.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


def answered_headers(routing: dict | None, shown: str) -> dict[str, str]:
    """Who answered, in headers (streamed answers too): the adapter, or the base when the question was
    outside the adapter's scope, with the similarity that decided it. A model named by a folder path is
    percent-encoded (headers are latin-1)."""
    if routing is None:
        return {"X-Loraforge-Answered-By": quote(shown, safe="/:@._-")}
    headers = {"X-Loraforge-Answered-By": quote(routing["answered_by"], safe="/:@._-"),
               "X-Loraforge-Scope": routing["scope"]}
    if "similarity" in routing:
        headers["X-Loraforge-Scope-Similarity"] = f"{routing['similarity']:.4f}"
        headers["X-Loraforge-Scope-Threshold"] = f"{routing['threshold']:g}"
    return headers


async def _result(channel, request: Request):
    """The request's result, or None if the client disconnected first; an error is raised."""
    getter = asyncio.ensure_future(_final(channel))
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            if done:
                return getter.result()
            if await request.is_disconnected():
                return None
    finally:
        getter.cancel()


async def _final(channel):
    while True:
        kind, payload = await channel.aget()
        if kind == "done":
            return payload
        if kind == "error":
            raise payload
