"""Per-request decoding: how the next token is chosen, log-probabilities, and where the text stops.

Each request in a batch keeps its own settings: greedy at temperature 0, else temperature and top-p
sampling from its own seeded generator (so a seeded request gives the same answer alone or in a batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # vLLM's extra: run to max_tokens (benchmarks)


@dataclass
class Sampler:
    """The choosing state of one request: its parameters and its random generator."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    def __post_init__(self) -> None:
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits (float32, shape [vocab])."""
        if self.params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            keep = cumulative - sorted_probs < self.params.top_p  # always keeps the likeliest token
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            return int(order[torch.multinomial(sorted_probs, 1, generator=self.generator)])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def logprob_entry(tokenizer, logits: torch.Tensor, token_id: int, top: int) -> dict:
    """OpenAI's `logprobs.content` item: the chosen token's log-probability under the model (before
    temperature and top-p) and the `top` likeliest tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def entry(tid: int, value: float) -> dict:
        text = tokenizer.decode([tid])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    item = entry(token_id, float(logp[token_id]))
    if top:
        best = torch.topk(logp, top)
        item["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(best.values, best.indices)]
    else:
        item["top_logprobs"] = []
    return item


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[:min(positions)], True


def safe_prefix(text: str, stop: tuple[str, ...]) -> str:
    """How much of `text` can be streamed now: never a half-decoded character, and never the start of
    what may become a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for its next token
        end -= 1
    hold = max((len(s) - 1 for s in stop if s), default=0)
    for k in range(min(hold, end), 0, -1):
        if any(s.startswith(text[end - k:end]) for s in stop if s):
            return text[:end - k]
    return text[:end]
