"""Inference: each base model loaded once, many adapters on it, chosen per request, batched together.

Adapters are attached to the one PeftModel of their base under the name `NAME@vN`. Every request is
decoded by its base's `BatchScheduler` (`engine/scheduler.py`): requests for the base and for any of
its adapters share one forward per step (peft's per-row `adapter_names`), each with its own sampling
settings, stop strings, `max_tokens` and seed. A request resolves `name` to one version when it is
submitted and keeps it to the end, whatever is promoted meanwhile; an adapter unloaded or deleted while
requests use it leaves only when the last of them ends. An adapter's files are checked against their
sha256 before it is attached, and its base fingerprint against the loaded base's. An adapter trained
with `scope: near` answers only questions near its training questions; the base answers the rest in
the same batch (`scope.py`), and each request says which answered.

Parts: `batch.py` (the running batch and its key/value cache), `sampling.py` (choosing tokens, stop
strings, log-probabilities), `scheduler.py` (the loop, the bounded queue, channels).
"""

from __future__ import annotations

import atexit
import threading
import weakref
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from loraforge.data import render
from loraforge.device import choose_placement
from loraforge.engine.batch import BASE_ADAPTER
from loraforge.engine.sampling import SamplingParams
from loraforge.engine.scheduler import BatchScheduler, Busy, Channel, GenerationRequest, Result
from loraforge.errors import Conflict, IntegrityError, LoraforgeError, NotFound
from loraforge.models import catalog, load_base_model, model_info, resolve_base_model
from loraforge.models.resolve import TINY, fingerprint, model_folder
from loraforge.names import parse_ref
from loraforge.scope import DEFAULT_THRESHOLD, MODES as SCOPE_MODES, Routing, Scope, last_user_text, read_scope
from loraforge.store import AdapterVersion, Store

__all__ = ["BASE_ADAPTER", "Busy", "Channel", "Completion", "Engine", "GenerationRequest", "LoadedBase",
           "SamplingParams"]


@dataclass
class LoadedBase:
    id: str
    requested: str
    model: object
    tokenizer: object
    fingerprint: str
    device: str
    precision: str
    context: int
    adapters: dict[str, AdapterVersion] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    peft: bool = False
    scheduler: BatchScheduler | None = None
    # each attached adapter's scope questions (None: it keeps none), and their fitted similarity once used
    scopes: dict[str, list[str] | None] = field(default_factory=dict)
    fitted_scopes: dict[str, Scope] = field(default_factory=dict)

    def remove_adapter(self, key: str) -> None:
        """Take an adapter's LoRA weights out of the model (with `lock` held); the last one takes peft out."""
        self.model.delete_adapter(key)
        self.scopes.pop(key, None)
        self.fitted_scopes.pop(key, None)
        remaining = list(self.model.peft_config)
        if not remaining:
            self.model = self.model.unload()
            self.peft = False
        else:
            self.model.set_adapter(remaining[0])  # peft keeps the deleted name active otherwise


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    model: str
    logprobs: list[dict] | None = None  # OpenAI `choices[].logprobs.content`, when asked for
    routing: dict | None = None  # for an adapter: who answered, and why (`Routing.public`)


class Engine:
    def __init__(self, store: Store, device: str = "auto", *, max_batch: int = 16, max_queued: int = 64):
        self.store = store
        self.device = device
        self.placement = choose_placement(device, "auto")
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.bases: dict[str, LoadedBase] = {}
        # a request's base model name passes this first (the server holds model paths inside its store)
        self.check_model = lambda name: None
        self._lock = threading.Lock()
        # held while a request looks an adapter up and attaches it, and while one is deleted: a delete never
        # removes files a load is reading, and a load never attaches a version whose records are gone
        self._registry_lock = threading.RLock()
        # stop the decode threads before the interpreter tears torch down under them (a weak reference:
        # the hook must not keep a closed engine's models alive)
        me = weakref.ref(self)
        atexit.register(lambda: (engine := me()) is not None and engine.close())

    # ---- loading ---------------------------------------------------------------------------------------
    def load_base(self, name: str) -> LoadedBase:
        ref = resolve_base_model(name)
        with self._lock:
            if ref.id in self.bases:
                return self.bases[ref.id]
            info = model_info(ref)
            placement = choose_placement(self.device, "auto", width=info.hidden_size)
            dtype = placement.autocast_dtype or torch.float32
            model, tokenizer = load_base_model(ref, device=placement.device, dtype=dtype)
            base = LoadedBase(ref.id, ref.requested, model, tokenizer, fingerprint(model_folder(ref)),
                              placement.device, placement.precision, info.context_length)
            base.scheduler = BatchScheduler(base, max_batch=self.max_batch, max_queued=self.max_queued)
            self.bases[ref.id] = base
            return base

    def unload_base(self, name: str) -> bool:
        ref = resolve_base_model(name)
        with self._lock:
            base = self.bases.pop(ref.id, None)
        if base is None:
            return False
        base.scheduler.stop()
        with base.lock:
            del base.model
        if base.device == "cuda":
            torch.cuda.empty_cache()
        return True

    def busy(self) -> bool:
        """Whether any request is generating or waiting on any base."""
        return any(b.scheduler.load()["running"] or b.scheduler.load()["waiting"] for b in list(self.bases.values()))

    def close(self) -> None:
        """Stop every decode thread and drop the loaded bases (a later request loads again)."""
        with self._lock:
            bases, self.bases = list(self.bases.values()), {}
        for base in bases:
            base.scheduler.stop()

    def is_base_name(self, name: str) -> bool:
        if name == TINY or name in catalog() or "/" in name or name.startswith("ollama:") or name.lower().endswith(
                ".gguf"):
            return True
        return any(b.requested == name or b.id == name for b in self.bases.values())

    def load_adapter(self, ref_text: str) -> tuple[LoadedBase, AdapterVersion]:
        """Attach an adapter version (loading its base first if needed); idempotent."""
        with self._registry_lock:
            return self._attach(ref_text)

    def _attach(self, ref_text: str) -> tuple[LoadedBase, AdapterVersion]:
        version = self.store.get(parse_ref(ref_text))
        base_name = version.config.get("model_name") or version.base_model
        base = self.bases.get(resolve_base_model(base_name).id) or self.load_base(base_name)
        if version.ref in base.adapters:  # attached: base.adapters changes only under the registry lock
            return base, version
        with base.lock:
            if version.ref in base.scheduler.pending_unload:  # still attached: keep it after all
                base.scheduler.pending_unload.discard(version.ref)
                base.adapters[version.ref] = version
                return base, version
            try:
                path = self.store.verify(version)
            except IntegrityError:
                if not self.store.exists(version.name):  # deleted by another process meanwhile
                    raise NotFound(f"adapter {version.ref!r} not found", field="adapter") from None
                raise
            if version.base_fingerprint and version.base_fingerprint != base.fingerprint:
                raise Conflict(f"adapter {version.ref} was trained on a different {base.requested} "
                               "(base fingerprint differs)", field="model")
            from peft import PeftModel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not base.peft:
                    base.model = PeftModel.from_pretrained(base.model, str(path), adapter_name=version.ref)
                    base.peft = True
                else:
                    base.model.load_adapter(str(path), adapter_name=version.ref)
            base.model.eval()
            base.scopes[version.ref] = read_scope(path)
            base.adapters[version.ref] = version
        return base, version

    def delete_adapter(self, name: str) -> int:
        """Detach every version of an adapter and delete it from the store; the number of versions removed."""
        with self._registry_lock:
            self.unload_adapter(name)
            return self.store.delete(name)

    def unload_adapter(self, ref_text: str) -> list[str]:
        """Detach an adapter's versions; one still in use by requests leaves when the last of them ends."""
        ref = parse_ref(ref_text)
        removed = []
        with self._registry_lock:
            for base in list(self.bases.values()):
                self._detach(base, ref, removed)
        return removed

    @staticmethod
    def _detach(base: LoadedBase, ref, removed: list[str]) -> None:
        with base.lock:
            for key in list(base.adapters):
                name, _, version = key.partition("@v")
                if name == ref.name and (ref.version is None or int(version) == ref.version):
                    del base.adapters[key]
                    removed.append(key)
                    if key in base.scheduler.in_use:
                        base.scheduler.pending_unload.add(key)
                    else:
                        base.remove_adapter(key)
        base.scheduler.wake()

    def loaded_adapters(self) -> dict[str, str]:
        return {key: base.requested for base in self.bases.values() for key in base.adapters}

    # ---- requests --------------------------------------------------------------------------------------
    def resolve_model(self, model: str) -> tuple[LoadedBase, str, str]:
        """(base, peft adapter name or BASE_ADAPTER, the name to report) for an OpenAI `model` field."""
        if not isinstance(model, str) or not model:
            raise LoraforgeError("model must be a non-empty string", field="model")
        self.check_model(model)
        if self.is_base_name(model):
            return self.load_base(model), BASE_ADAPTER, model
        ref = parse_ref(model, "model")
        ref_text = self.store.get(ref).ref if ref.version is None else str(ref)
        base, version = self.load_adapter(ref_text)
        return base, version.ref, model

    def routing(self, base: LoadedBase, adapter: str, messages: list[dict], scope: str | None = None) -> Routing:
        """Whether an attached adapter answers these messages or leaves them to the base: its config's `scope`
        (or the request's), and with `near`, the last user turn's similarity to its training questions."""
        version = base.adapters[adapter]
        mode = scope or version.config.get("scope") or "all"
        if mode not in SCOPE_MODES:
            raise LoraforgeError(f"scope must be one of {', '.join(SCOPE_MODES)}", field="scope")
        if mode == "all":
            return Routing("all")
        with base.lock:
            fitted = base.fitted_scopes.get(adapter)
            if fitted is None:
                questions = base.scopes.get(adapter)
                if questions is None:
                    raise LoraforgeError(f"adapter {adapter} keeps no training questions (imported, or trained "
                                         "before scopes were kept): it can only answer with scope all", field="scope")
                fitted = base.fitted_scopes[adapter] = Scope(questions)
        threshold = float(version.config.get("scope_threshold") or DEFAULT_THRESHOLD)
        return Routing("near", threshold, fitted.similarity(last_user_text(messages)))

    def route(self, model: str, messages: list[dict], scope: str | None = None) -> dict | None:
        """Who would answer these messages for `model` (None for a base model), without generating."""
        with self._registry_lock:
            base, adapter, _shown = self.resolve_model(model)
            if adapter == BASE_ADAPTER:
                return None
            return self.routing(base, adapter, messages, scope).public(adapter, base.requested)

    def request(self, model: str, messages: list[dict], params: SamplingParams, channel: Channel, *,
                bounded: bool = True, scope: str | None = None) -> tuple[GenerationRequest, str]:
        """Resolve the model, check the lengths and queue one generation; (the request, the name shown).
        For an adapter, `request.routing` says who answers (`routing`). Resolving and queueing hold the
        registry lock: a delete cannot detach the adapter in between."""
        with self._registry_lock:
            base, adapter, shown = self.resolve_model(model)
            routing = None
            if adapter != BASE_ADAPTER:
                decision = self.routing(base, adapter, messages, scope)
                routing = decision.public(adapter, base.requested)
                if not decision.to_adapter:
                    adapter = BASE_ADAPTER
            text = render(base.tokenizer, messages, add_generation_prompt=True)
            prompt_ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(prompt_ids) >= base.context:
                raise LoraforgeError(f"the prompt is {len(prompt_ids)} tokens; {base.requested} reads at most "
                                     f"{base.context}", field="messages")
            if len(prompt_ids) + params.max_tokens > base.context:
                raise LoraforgeError(f"max_tokens {params.max_tokens} with a prompt of {len(prompt_ids)} tokens "
                                     f"exceeds the context of {base.requested} ({base.context} tokens); ask for at most "
                                     f"{base.context - len(prompt_ids)}", field="max_tokens")
            eos = base.model.generation_config.eos_token_id if hasattr(base.model, "generation_config") else None
            eos_ids = frozenset(([eos] if isinstance(eos, int) else list(eos or [])) + [base.tokenizer.eos_token_id])
            request = GenerationRequest(prompt_ids, adapter, params, channel, base.tokenizer, eos_ids, base.context)
            request.routing = routing
            base.scheduler.submit(request, bounded=bounded)
            return request, shown

    def complete(self, model: str, messages: list[dict], *, temperature: float = 0.0, top_p: float = 1.0,
                 max_tokens: int = 128, stop: list[str] | None = None, seed: int | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, scope: str | None = None) -> Completion:
        """One answer, waited for. With `logprobs`, each generated token's log-probability under the model
        (before temperature and top-p), and the `top_logprobs` likeliest tokens at each position."""
        params = SamplingParams(temperature, top_p, max_tokens, tuple(stop or ()), seed, logprobs, top_logprobs)
        channel = Channel()
        request, shown = self.request(model, messages, params, channel, bounded=False, scope=scope)
        result = wait(channel)
        return Completion(result.text.strip(), result.prompt_tokens, result.completion_tokens,
                          result.finish_reason, shown, result.logprobs, request.routing)

    def stream(self, model: str, messages: list[dict], *, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int = 128, stop: list[str] | None = None, seed: int | None = None,
               scope: str | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated; closing the iterator cancels the request."""
        channel = Channel()
        request, _shown = self.request(model, messages, SamplingParams(temperature, top_p, max_tokens,
                                                                       tuple(stop or ()), seed), channel,
                                       bounded=False, scope=scope)
        return _pieces(channel, request)

    def generate_batch(self, model: str, chats: list[list[dict]], *, n: int = 1, temperature: float = 0.0,
                       top_p: float = 1.0, max_tokens: int = 96, seed: int | None = None,
                       scope: str | None = None) -> list[list[str]]:
        """`n` answers per chat, all submitted at once so they decode together (evaluation; not streamed).
        Sample j of a seeded run uses seed + j."""
        if n > 1 and not temperature:
            raise LoraforgeError("several samples per prompt need temperature > 0", field="temperature")
        channels = []
        for chat in chats:
            for j in range(n):
                channel = Channel()
                params = SamplingParams(temperature, top_p, max_tokens, (), None if seed is None else seed + j)
                self.request(model, chat, params, channel, bounded=False, scope=scope)
                channels.append(channel)
        answers = [wait(c).text.strip() for c in channels]
        return [answers[i * n:(i + 1) * n] for i in range(len(chats))]


def wait(channel: Channel) -> Result:
    """The request's result (its deltas are skipped); its error, raised."""
    while True:
        kind, payload = channel.get()
        if kind == "done":
            return payload
        if kind == "error":
            raise payload


def _pieces(channel: Channel, request: GenerationRequest) -> Iterator[str]:
    try:
        while True:
            kind, payload = channel.get()
            if kind == "delta":
                yield payload
            elif kind == "done":
                return
            else:
                raise payload
    finally:
        request.cancel()
