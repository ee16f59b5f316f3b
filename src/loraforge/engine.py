"""Inference: each base model loaded once, many adapters on it, chosen per request.

Adapters are attached to the one PeftModel of their base under the name `NAME@vN` and selected per
call with peft's `adapter_names` argument — there is no global "current adapter" that two requests
could race on. Generation on one base is serialised by that base's lock (one CPU/GPU, one stream).
An adapter's files are checked against their sha256 before it is attached, and its base fingerprint
against the loaded base's.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from loraforge.data import render
from loraforge.device import choose_placement
from loraforge.errors import Conflict, LoraforgeError
from loraforge.generation import batch_generate, decoding_kwargs
from loraforge.models import catalog, load_base_model, resolve_base_model
from loraforge.models.resolve import TINY, fingerprint, model_folder
from loraforge.names import parse_ref
from loraforge.store import AdapterVersion, Store

BASE_ADAPTER = "__base__"


@dataclass
class LoadedBase:
    id: str
    requested: str
    model: object
    tokenizer: object
    fingerprint: str
    device: str
    adapters: dict[str, AdapterVersion] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    peft: bool = False


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    model: str
    logprobs: list[dict] | None = None  # OpenAI `choices[].logprobs.content`, when asked for


class Engine:
    def __init__(self, store: Store, device: str = "auto"):
        self.store = store
        self.placement = choose_placement(device, "auto")
        self.bases: dict[str, LoadedBase] = {}
        self._lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------------------
    def load_base(self, name: str) -> LoadedBase:
        ref = resolve_base_model(name)
        with self._lock:
            if ref.id in self.bases:
                return self.bases[ref.id]
            dtype = torch.float32
            if self.placement.device == "cuda":
                dtype = self.placement.autocast_dtype or torch.float32
            model, tokenizer = load_base_model(ref, device=self.placement.device, dtype=dtype)
            base = LoadedBase(ref.id, ref.requested, model, tokenizer, fingerprint(model_folder(ref)),
                              self.placement.device)
            self.bases[ref.id] = base
            return base

    def unload_base(self, name: str) -> bool:
        ref = resolve_base_model(name)
        with self._lock:
            base = self.bases.pop(ref.id, None)
        if base is None:
            return False
        with base.lock:
            del base.model
        if self.placement.device == "cuda":
            torch.cuda.empty_cache()
        return True

    def is_base_name(self, name: str) -> bool:
        if name == TINY or name in catalog() or "/" in name or name.startswith("ollama:") or name.lower().endswith(
                ".gguf"):
            return True
        return any(b.requested == name or b.id == name for b in self.bases.values())

    def load_adapter(self, ref_text: str) -> tuple[LoadedBase, AdapterVersion]:
        """Attach an adapter version (loading its base first if needed); idempotent."""
        version = self.store.get(parse_ref(ref_text))
        base_name = version.config.get("model_name") or version.base_model
        base = self.bases.get(resolve_base_model(base_name).id) or self.load_base(base_name)
        with base.lock:
            if version.ref in base.adapters:
                return base, version
            path = self.store.verify(version)
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
            base.adapters[version.ref] = version
        return base, version

    def unload_adapter(self, ref_text: str) -> list[str]:
        ref = parse_ref(ref_text)
        removed = []
        for base in list(self.bases.values()):
            with base.lock:
                for key in list(base.adapters):
                    name, _, version = key.partition("@v")
                    if name == ref.name and (ref.version is None or int(version) == ref.version):
                        base.model.delete_adapter(key)
                        del base.adapters[key]
                        removed.append(key)
                if base.peft and not base.adapters:  # no adapter left: take the LoRA layers out again
                    base.model = base.model.unload()
                    base.peft = False
                elif removed and base.adapters:  # peft keeps the deleted name active otherwise
                    base.model.set_adapter(next(iter(base.adapters)))
        return removed

    def loaded_adapters(self) -> dict[str, str]:
        return {key: base.requested for base in self.bases.values() for key in base.adapters}

    # ---- generation ------------------------------------------------------------------------------------
    def resolve_model(self, model: str) -> tuple[LoadedBase, str, str]:
        """(base, peft adapter name or BASE_ADAPTER, the name to report) for an OpenAI `model` field."""
        if not isinstance(model, str) or not model:
            raise LoraforgeError("model must be a non-empty string", field="model")
        if self.is_base_name(model):
            return self.load_base(model), BASE_ADAPTER, model
        ref = parse_ref(model, "model")
        if ref.version is None:
            version = self.store.get(ref)
            ref_text = version.ref
        else:
            ref_text = str(ref)
        base, version = self.load_adapter(ref_text)
        return base, version.ref, model

    def _prepare(self, base: LoadedBase, messages: list[dict]) -> dict:
        text = render(base.tokenizer, messages, add_generation_prompt=True)
        enc = base.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return {k: v.to(base.device) for k, v in enc.items()}

    def _gen_kwargs(self, base: LoadedBase, adapter: str, *, temperature: float, top_p: float, max_tokens: int,
                    stop: list[str], seed: int | None) -> dict:
        kwargs = decoding_kwargs(base.tokenizer, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 seed=seed)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=base.tokenizer)
        if base.peft:
            kwargs["adapter_names"] = [adapter]
        return kwargs

    def complete(self, model: str, messages: list[dict], *, temperature: float = 0.0, top_p: float = 1.0,
                 max_tokens: int = 128, stop: list[str] | None = None, seed: int | None = None,
                 logprobs: bool = False, top_logprobs: int = 0) -> Completion:
        """One answer. With `logprobs`, each generated token's log-probability under the model (before
        temperature and top-p), and the `top_logprobs` likeliest tokens at each position."""
        base, adapter, shown = self.resolve_model(model)
        with base.lock, torch.no_grad():
            enc = self._prepare(base, messages)
            kwargs = self._gen_kwargs(base, adapter, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                      stop=stop or [], seed=seed)
            out = base.model.generate(**enc, **kwargs, return_dict_in_generate=True, output_logits=logprobs)
        new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
        text = base.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stop or [])
        ended = stopped or (new and new[-1] == base.tokenizer.eos_token_id) or len(new) < max_tokens
        token_logprobs = (_token_logprobs(base.tokenizer, out.logits, new, top_logprobs) if logprobs else None)
        return Completion(text.strip(), int(enc["input_ids"].shape[1]), len(new), "stop" if ended else "length",
                          shown, token_logprobs)

    def generate_batch(self, model: str, chats: list[list[dict]], *, n: int = 1, temperature: float = 0.0,
                       top_p: float = 1.0, max_tokens: int = 96, seed: int | None = None) -> list[list[str]]:
        """`n` answers per chat, generated as one left-padded batch (evaluation; not streamed)."""
        if n > 1 and not temperature:
            raise LoraforgeError("several samples per prompt need temperature > 0", field="temperature")
        base, adapter, _shown = self.resolve_model(model)
        with base.lock:
            return batch_generate(base.model, base.tokenizer, chats, n=n, temperature=temperature, top_p=top_p,
                                  max_tokens=max_tokens, seed=seed, device=base.device,
                                  adapter_name=adapter if base.peft else None)

    def stream(self, model: str, messages: list[dict], *, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int = 128, stop: list[str] | None = None, seed: int | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (the base stays locked until the stream ends)."""
        from transformers import TextIteratorStreamer

        base, adapter, _shown = self.resolve_model(model)
        streamer = TextIteratorStreamer(base.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with base.lock, torch.no_grad():  # held by the generating thread for the whole stream
                    enc = self._prepare(base, messages)
                    base.model.generate(**enc, streamer=streamer, **self._gen_kwargs(
                        base, adapter, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                        stop=stop or [], seed=seed))
            except BaseException as exc:  # reported to the stream's reader
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        emitted = ""
        for piece in streamer:
            cut, stopped = _cut_at_stop(emitted + piece, stop or [])
            if stopped:
                if len(cut) > len(emitted):
                    yield cut[len(emitted):]
                break
            emitted += piece
            yield piece
        worker.join()
        if errors:
            raise errors[0]


def _token_logprobs(tokenizer, logits: tuple[torch.Tensor, ...], tokens: list[int], top: int) -> list[dict]:
    """OpenAI's `logprobs.content`: per generated token, its log-probability and the `top` likeliest."""
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for step_logits, token_id in zip(logits, tokens):
        logp = torch.log_softmax(step_logits[0].float(), dim=-1)
        item = entry(token_id, float(logp[token_id]))
        best = torch.topk(logp, top) if top else None
        item["top_logprobs"] = ([entry(int(i), float(v)) for v, i in zip(best.values, best.indices)]
                                if best is not None else [])
        content.append(item)
    return content


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True

