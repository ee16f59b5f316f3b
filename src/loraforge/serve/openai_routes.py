"""OpenAI-compatible endpoints: `model` picks a base model, an adapter or `adapter@vN` per request."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

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
def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = request.app.state.engine
    messages = [m.model_dump() for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or 128
    params = dict(temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens, stop=body.stop,
                  seed=body.seed)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        result = engine.complete(body.model, messages, **params, logprobs=body.logprobs,
                                 top_logprobs=body.top_logprobs or 0)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": result.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason,
                         "logprobs": {"content": result.logprobs} if body.logprobs else None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }
    engine.resolve_model(body.model)  # unknown model or bad adapter: a 4xx before the stream starts
    pieces = engine.stream(body.model, messages, **params)

    def chunk(delta: dict, finish: str | None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(payload)}\n\n"

    def stream():
        yield chunk({"role": "assistant", "content": ""}, None)
        try:
            for piece in pieces:
                if piece:
                    yield chunk({"content": piece}, None)
        except Exception:
            yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error'}})}\n\n"
            return
        yield chunk({}, "stop")
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
