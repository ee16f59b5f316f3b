"""Keeping what the base knew: anchor prompts answered by the base itself, mixed into every step.

`retention: replay` trains on the base's own answers to general prompts beside the new data
(cross-entropy); `retention: kl` holds the adapted model's next-token distribution on those answers
close to the base's, with the adapter switched off as the teacher (no second model in memory). Either
way the anchor loss is normalised per anchor token and added with `retention_weight`, so the new data's
gradient is the same as without it; `retention_ratio` anchors join each step per training example.
`retention_nearest` chooses that share of them next to the step's own training questions (TF-IDF
similarity of the prompts) rather than at random: an update interferes most with the questions that look
like the ones it learns from ("the capital of Tesselia" moves "the capital of Malaysia").

The anchors are prompts, never answers: the base writes the answers at the start of the run (greedy,
cut to their last complete sentence), cached per base fingerprint, precision and prompt set. The
built-in prompts (`evals/data/anchor_prompts.jsonl`: capitals, sums, units, people, science, everyday
instructions) share no prompt with the built-in retention probes, so retention is measured on questions
the run never saw. For `tiny`, the anchors are its corpus's other phrasings (the probes are the first).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from loraforge import paths
from loraforge.data import Example, render
from loraforge.errors import ConfigError
from loraforge.structured import read_structured

ANCHOR_PROMPTS = Path(__file__).resolve().parents[1] / "evals" / "data" / "anchor_prompts.jsonl"
MAX_NEW_TOKENS = 64
NEAREST_K = 8  # neighbours per training example that `retention_nearest` cycles through, one per epoch
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def anchor_prompts(spec: str, model_kind: str) -> list[str]:
    """`builtin` or a file (already checked and made absolute at the boundary) of {prompt} records."""
    if spec == "builtin":
        if model_kind == "tiny":
            from loraforge.models.tiny import corpus

            return [q for fact in corpus.facts() for q in fact.phrasings[1:]]
        path = ANCHOR_PROMPTS
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"anchor prompts file {path.name!r} not found", field="retention_anchors")
    raw = read_structured(path)
    rows = raw if isinstance(raw, list) else raw.get("prompts") if isinstance(raw, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{path.name}: anchor prompts must be a non-empty list of {{prompt}}",
                          field="retention_anchors")
    prompts = []
    for index, row in enumerate(rows):
        prompt = row.get("prompt") if isinstance(row, dict) else row if isinstance(row, str) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{path.name}: anchor {index + 1}: needs a non-empty prompt",
                              field="retention_anchors")
        prompts.append(prompt)
    return prompts


def complete_sentences(text: str) -> str | None:
    """The text up to its last complete sentence, or None when it holds none."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]].strip() if ends else None


@torch.no_grad()
def base_answers(model, tokenizer, prompts: list[str], *, device: str, batch_size: int = 32,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> list[str | None]:
    """The base's greedy answers: whole when it ended them, else cut to the last complete sentence."""
    from loraforge.generation import decoding_kwargs

    answers: list[str | None] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            texts = [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, **decoding_kwargs(tokenizer, temperature=0.0, top_p=1.0,
                                                          max_tokens=max_new_tokens, seed=None))
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                ended = tokenizer.eos_token_id in row
                text = tokenizer.decode(row[:row.index(tokenizer.eos_token_id)] if ended else row,
                                        skip_special_tokens=True).strip()
                answers.append((text or None) if ended else complete_sentences(text))
    finally:
        tokenizer.padding_side = side
    return answers


def anchor_examples(model, tokenizer, prompts: list[str], *, device: str, cache_key: str,
                    log=print) -> list[Example]:
    """Anchor prompts with the base's answers as examples, from the store's cache when it has them."""
    digest = hashlib.sha256(json.dumps([cache_key, prompts, MAX_NEW_TOKENS]).encode()).hexdigest()[:20]
    cache = paths.home() / "snapshots" / f"anchors-{digest}.json"
    if cache.is_file():
        answers = json.loads(cache.read_text(encoding="utf-8"))["answers"]
    else:
        log(f"retention: the base answers {len(prompts)} anchor prompts (once; cached)")
        answers = base_answers(model, tokenizer, prompts, device=device)
        paths.atomic_write_json(cache, {"key": cache_key, "prompts": prompts, "answers": answers})
    examples = [Example(i + 1, [{"role": "user", "content": p}, {"role": "assistant", "content": a}])
                for i, (p, a) in enumerate(zip(prompts, answers)) if a]
    if not examples:
        raise ConfigError("retention: the base answered none of the anchor prompts", field="retention_anchors")
    return examples


def nearest_anchors(queries: list[str], anchors: list[str], *, seed: int = 0,
                    k: int = NEAREST_K) -> list[list[int]]:
    """For each query, the indices of its `k` most similar anchors (TF-IDF cosine of the prompts' content
    words and word pairs), most similar first; equally similar ones (twenty "What is the capital of …?") in a seeded
    random order, so that different questions draw different neighbours."""
    from loraforge.scope import text_vectorizer

    vectorizer = text_vectorizer().fit(anchors + queries)
    similarity = (vectorizer.transform(queries) @ vectorizer.transform(anchors).T).toarray().round(6)
    generator = torch.Generator().manual_seed(seed)
    ranked = []
    for row in similarity:
        tie = torch.randperm(len(anchors), generator=generator).tolist()
        ranked.append(sorted(range(len(anchors)), key=lambda j: (-row[j], tie[j]))[:k])
    return ranked


class AnchorStream:
    """Anchors handed out a few per step: round-robin through a seeded permutation, and, with `near`
    (per training example, its nearest anchors), a share chosen next to the step's own training questions.

    The nearest share is stateless (example and epoch decide which neighbour), so a resumed run picks the
    same anchors; the round-robin part resumes from `position`.
    """

    def __init__(self, anchors: list, seed: int, near: list[list[int]] | None = None,
                 nearest_share: float = 0.0):
        self.anchors = anchors
        self.order = torch.randperm(len(anchors), generator=torch.Generator().manual_seed(seed)).tolist()
        self.position = 0
        self.near = near if near and nearest_share > 0 else None
        self.nearest_share = nearest_share

    def take(self, count: int, examples: list[int] = (), epoch: int = 0) -> list:
        """`count` anchors for a step whose training examples are `examples` (indices into the data)."""
        picked = []
        if self.near is not None and examples:
            for slot in range(math.floor(count * self.nearest_share + 0.5)):  # half rounds up
                index = examples[slot % len(examples)]
                ranked = self.near[index]
                picked.append(self.anchors[ranked[(epoch + slot // len(examples)) % len(ranked)]])
        while len(picked) < count:
            picked.append(self.anchors[self.order[self.position % len(self.order)]])
            self.position += 1
        return picked
