"""Continuous batching for one loaded base: requests join between steps, finished ones leave.

One thread per base runs the loop: admit waiting requests (each prefilled alone, then joined to the
running batch), run one decode step for every running row, hand each row's token to its request, drop
the rows that finished or were cancelled. Requests wait in a bounded queue; beyond it `submit` raises
`Busy` (the server answers 429). A request's events go to its `Channel`: text deltas, then one `done`
(or `error`) event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from loraforge.engine.batch import Row, RunningBatch
from loraforge.engine.sampling import Sampler, SamplingParams, cut_at_stop, logprob_entry, safe_prefix
from loraforge.errors import LoraforgeError

log = logging.getLogger("loraforge.engine")


class Busy(LoraforgeError):
    code = "server_busy"
    status = 429

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, field=None)
        self.retry_after = retry_after


class Channel:
    """Where a request's events go: a thread queue, or an asyncio queue of a given event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def put(self, event: tuple) -> None:
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the loop closed: nobody is listening any more
                pass
        else:
            self._queue.put(event)

    def get(self, timeout: float | None = None) -> tuple:
        return self._queue.get(timeout=timeout)

    async def aget(self) -> tuple:
        return await self._queue.get()


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str
    params: SamplingParams
    channel: Channel
    tokenizer: object
    eos_ids: frozenset[int]
    context: int
    sampler: Sampler = field(init=False)
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    logprobs: list[dict] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    submitted: float = field(default_factory=time.monotonic)
    routing: dict | None = None  # for an adapter's request: who answers (`Engine.routing`)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        if self.params.logprobs:
            self.logprobs = []

    def cancel(self) -> None:
        """Stop generating for this request (a client went away); its row leaves at the next step."""
        self.cancelled.set()

    def accept(self, logits: torch.Tensor) -> bool:
        """Choose the next token from this row's logits, stream what became final; True when done."""
        token = self.sampler.choose(logits)
        if self.logprobs is not None:
            self.logprobs.append(logprob_entry(self.tokenizer, logits, token, self.params.top_logprobs))
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text, stopped = cut_at_stop(text, self.params.stop)
        reason = None
        if stopped or (token in self.eos_ids and not self.params.ignore_eos):
            reason = "stop"
        elif len(self.generated) >= self.params.max_tokens or len(self.prompt_ids) + len(self.generated) >= \
                self.context:
            reason = "length"
        ready = text if reason else safe_prefix(text, self.params.stop)
        if len(ready) > len(self.emitted) and ready.startswith(self.emitted):
            self.channel.put(("delta", ready[len(self.emitted):]))
            self.emitted = ready
        if reason:
            self.finished = True
            self.channel.put(("done", Result(text, reason, len(self.prompt_ids), len(self.generated),
                                             self.logprobs)))
        return self.finished

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.channel.put(("error", error))


class BatchScheduler:
    """The decode loop of one base. `base` is the engine's LoadedBase (model, tokenizer, lock, peft)."""

    def __init__(self, base, *, max_batch: int = 16, max_queued: int = 64):
        self.base = base
        self.max_batch = max(1, max_batch)
        self.max_queued = max(0, max_queued)
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.batch = RunningBatch()
        self.in_use: collections.Counter[str] = collections.Counter()  # adapter -> waiting + running requests
        self.pending_unload: set[str] = set()
        self._cond = threading.Condition()
        self._stopped = False
        # measured, for /api/serving: how much batching actually happened
        self.stats = {"requests_finished": 0, "tokens_generated": 0, "decode_steps": 0, "rows_decoded": 0,
                      "largest_batch": 0}
        self._thread = threading.Thread(target=self._loop, name=f"loraforge-decode-{base.requested}", daemon=True)
        self._thread.start()

    # ---- the outside -----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, *, bounded: bool = True) -> None:
        with self._cond:
            if self._stopped:
                raise LoraforgeError("the model was unloaded", field="model")
            if bounded and len(self.waiting) >= self.max_queued:
                raise Busy(f"{len(self.batch)} requests are generating and {len(self.waiting)} are waiting on "
                           f"{self.base.requested} (limits: --max-batch {self.max_batch}, --max-queued "
                           f"{self.max_queued}); retry shortly")
            self.waiting.append(request)
            self.in_use[request.adapter] += 1
            self._cond.notify()

    def load(self) -> dict:
        with self._cond:
            stats = dict(self.stats)
            steps = stats["decode_steps"]
            return {"running": len(self.batch), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queued": self.max_queued, **stats,
                    "mean_batch": round(stats["rows_decoded"] / steps, 2) if steps else None}

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the loop --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self.waiting and not self.batch.rows and not self._unloadable():
                    self._cond.wait()
                if self._stopped:
                    break
                joiners = []
                while self.waiting and len(self.batch) + len(joiners) < self.max_batch:
                    joiners.append(self.waiting.popleft())
            try:
                with self.base.lock, torch.no_grad():
                    for request in joiners:
                        self._prefill(request)
                    if self.batch.rows:
                        self._decode_step()
                    self._unload_unused()
            except Exception as exc:  # a failed forward fails the requests in it, not the server
                log.exception("decode step failed")
                for request in [r.key for r in self.batch.rows] + joiners:
                    if not request.finished:
                        request.fail(exc)
                        self._release(request)
                self.batch = RunningBatch()
        with self._cond:
            leftovers = list(self.waiting) + [r.key for r in self.batch.rows]
            self.waiting.clear()
        for request in leftovers:
            request.fail(LoraforgeError("the model was unloaded", field="model"))

    def _forward(self, **inputs) -> torch.Tensor:
        if self.base.peft:
            inputs["adapter_names"] = inputs.pop("adapters")
        else:
            inputs.pop("adapters")
        return self.base.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()

    def _prefill(self, request: GenerationRequest) -> None:
        from transformers import DynamicCache

        if request.cancelled.is_set():
            self._release(request)
            return
        device = self.base.device
        length = len(request.prompt_ids)
        cache = DynamicCache()
        logits = self._forward(input_ids=torch.tensor([request.prompt_ids], device=device),
                               position_ids=torch.arange(length, device=device)[None], past_key_values=cache,
                               use_cache=True, adapters=[request.adapter])
        if request.accept(logits[0]):
            self._release(request)
            return
        self.batch.join(Row(request, request.adapter, request.generated[-1], length), cache, length)

    def _decode_step(self) -> None:
        rows = self.batch.rows
        logits = self._forward(**self.batch.step_inputs(self.base.device), adapters=[r.adapter for r in rows])
        with self._cond:
            self.stats["decode_steps"] += 1
            self.stats["rows_decoded"] += len(rows)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        keep = []
        for index, row in enumerate(rows):
            request = row.key
            if request.cancelled.is_set():
                self._release(request)
                continue
            if request.accept(logits[index]):
                self._release(request)
                continue
            row.next_token, row.position = request.generated[-1], row.position + 1
            keep.append(index)
        self.batch.keep(keep)

    def _release(self, request: GenerationRequest) -> None:
        with self._cond:
            self.stats["requests_finished"] += 1
            self.stats["tokens_generated"] += len(request.generated)
            self.in_use[request.adapter] -= 1
            if self.in_use[request.adapter] <= 0:
                del self.in_use[request.adapter]

    def _unloadable(self) -> bool:
        return any(name not in self.in_use for name in self.pending_unload)

    def _unload_unused(self) -> None:
        """Adapters whose unloading waited for their last request (called with the base's lock held)."""
        for name in list(self.pending_unload):
            with self._cond:
                busy = name in self.in_use
            if not busy:
                self.pending_unload.discard(name)
                self.base.remove_adapter(name)

