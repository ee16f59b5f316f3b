"""Knowledge evaluation during training: score the suite every `eval_steps`, keep the best, stop at a target.

The base's answers are taken once at the start with the adapter disabled (retention probes and the
base run that retention is scored against). "Best" is the highest efficacy, then retention, then
generalization; training stops when efficacy reaches the target.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.evals.runner import SuiteRun, load_probes, run_cases, score_run, snapshot_cases, take_snapshot
from loraforge.evals.suite import Case, Suite
from loraforge.generation import batch_generate


def _rank(scores: dict) -> tuple:
    return tuple(-1.0 if scores.get(k) is None else scores[k] for k in ("efficacy", "retention", "generalization"))


class KnowledgeMonitor:
    def __init__(self, suite: Suite, *, target: float = 1.0, max_tokens: int = 96):
        self.suite = suite
        self.target = target
        self.max_tokens = max_tokens
        self.cases: list[Case] = list(suite.cases)
        self.base_run: SuiteRun | None = None
        self.history: list[dict] = []
        self.best: dict | None = None

    def _generate(self, model, tokenizer, device):
        def generate(chats, n):
            return batch_generate(model, tokenizer, chats, n=n, max_tokens=self.max_tokens, device=device)
        return generate

    def start(self, model, tokenizer, device: str) -> dict:
        """Score the base (adapter disabled); returns its scores."""
        with model.disable_adapter():
            generate = self._generate(model, tokenizer, device)
            if self.suite.retention is not None:
                probes = load_probes(self.suite.retention.probes,
                                     Path(self.suite.source_dir) if self.suite.source_dir else None)
                snap = take_snapshot(generate, probes, model="base", fingerprint=None)
                self.cases += snapshot_cases(snap, self.suite.retention.tags, self.suite.retention.exclude_tags)
            self.base_run = run_cases(generate, self.suite, self.cases, model="base")
        return self.base_run.scores

    def check(self, model, tokenizer, device: str, step: int) -> tuple[dict, bool, bool]:
        """(scores, improved, reached target) at `step`."""
        run = run_cases(self._generate(model, tokenizer, device), self.suite, self.cases, model="adapter")
        score_run(run, self.base_run)
        entry = {"step": step, **run.scores}
        self.history.append(entry)
        improved = self.best is None or _rank(run.scores) > _rank(self.best)
        if improved:
            self.best = entry
        efficacy = run.scores.get("efficacy")
        return run.scores, improved, efficacy is not None and efficacy >= self.target

    def summary(self, stopped_at: int | None) -> dict:
        return {"suite": self.suite.name, "target_efficacy": self.target,
                "base": self.base_run.scores if self.base_run else None, "evals": self.history,
                "best": self.best, "stopped_early_at": stopped_at}
