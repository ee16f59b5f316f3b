"""An adapter's scope: the questions it was taught, and whether a new question is near enough to them.

A knowledge adapter changes answers everywhere a little, not only on what it learned: on SmolLM2-135M
the recommended config keeps ~90% of the base's correct general answers (`docs/retention-methods.md`).
`scope: near` in a config lets the adapter answer only questions that look like its training
questions, and the base answer the rest, on the same loaded model (SERAC's scope classifier, Mitchell
et al. 2022, with TF-IDF similarity instead of a trained classifier: it needs nothing but the training
questions). Measured on held-out facts (`docs/retention-routing.md`): retention 90% -> 98%, the facts and
their unseen paraphrases unchanged, because a paraphrase names the fact's rare words ("Tesselia") and a
general question shares none of them.

Similarity is the cosine of TF-IDF vectors over content words and word pairs (English stop words
left out), fitted on the training questions; a question is in scope when its highest similarity to
one of them reaches the threshold (default 0.2, chosen on the development facts). Every version keeps
its questions in `scope.jsonl` — its own training data's user turns plus its parent's scope, so a
foundation adapter grown by nightly updates answers everything its lineage was taught.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loraforge import paths

SCOPE_FILE = "scope.jsonl"
DEFAULT_THRESHOLD = 0.2
MODES = ("all", "near")


def text_vectorizer(stop_words: str | None = "english"):
    """TF-IDF over content words and word pairs: what scope and `retention_nearest` compare prompts with."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words=stop_words)


def user_text(messages: Iterable[dict]) -> str:
    """The user turns of a chat, joined: a training example's question."""
    return "\n".join(m["content"] for m in messages if m.get("role") == "user")


def last_user_text(messages: list[dict]) -> str:
    """What a request asks now: its last user turn (earlier turns and the system prompt do not count)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message["content"]
    return ""


def scope_questions(examples: Iterable, inherited: Iterable[str] = ()) -> list[str]:
    """The questions of a new version: those it inherits, then its own examples' user turns; each once."""
    seen: dict[str, None] = dict.fromkeys(q for q in inherited if q.strip())
    for example in examples:
        question = user_text(example.messages)
        if question.strip():
            seen.setdefault(question, None)
    return list(seen)


def write_scope(folder: Path, questions: list[str]) -> None:
    paths.atomic_write_text(paths.inside(folder, SCOPE_FILE),
                            "".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in questions))


def read_scope(folder: Path) -> list[str] | None:
    """A version folder's scope questions, or None when it has none (imported, or trained before scopes)."""
    path = paths.inside(folder, SCOPE_FILE)
    if not path.is_file():
        return None
    return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Scope:
    """Similarity of a question to the nearest of an adapter's training questions (0 to 1)."""

    def __init__(self, questions: list[str]):
        self.vectorizer = self.matrix = None
        for stop_words in ("english", None):  # questions made only of stop words ("What is it?") keep them
            try:
                self.vectorizer = text_vectorizer(stop_words).fit(questions)
            except ValueError:  # empty vocabulary
                continue
            self.matrix = self.vectorizer.transform(questions)
            break

    def similarity(self, text: str) -> float:
        if self.vectorizer is None or not text.strip():
            return 0.0
        return float((self.vectorizer.transform([text]) @ self.matrix.T).toarray().max(initial=0.0))


@dataclass(frozen=True)
class Routing:
    """Who answers a request for an adapter: the adapter or the base."""

    mode: str  # "all" or "near"
    threshold: float | None = None
    similarity: float | None = None  # with mode "near"

    @property
    def to_adapter(self) -> bool:
        return self.mode == "all" or self.similarity >= self.threshold

    def public(self, adapter: str, base: str) -> dict:
        """What a response says: the adapter version asked for, who answered (it or the base), and why."""
        out = {"adapter": adapter, "answered_by": adapter if self.to_adapter else base, "scope": self.mode}
        if self.mode == "near":
            out |= {"similarity": round(self.similarity, 4), "threshold": self.threshold}
        return out
