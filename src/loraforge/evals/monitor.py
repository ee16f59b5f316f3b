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


def _fmt_scores(scores: dict) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in scores.items() if v is not None) or "no cases"


class KnowledgeMonitor:
    """A `train.recipe.TrainingMonitor` for a knowledge suite."""

    manifest_key = "knowledge"

    def __init__(self, suite: Suite, *, target: float = 1.0, max_tokens: int = 96, model_name: str | None = None):
        self.suite = suite
        self.model_name = model_name  # which built-in probe set applies
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

    def eval_interval(self, steps_per_epoch: int, total_steps: int, configured: int) -> int:
        return configured or max(1, total_steps // 10)

    def start(self, model, tokenizer, device: str) -> str:
        """Score the base (adapter disabled)."""
        with model.disable_adapter():
            generate = self._generate(model, tokenizer, device)
            if self.suite.retention is not None:
                probes = load_probes(self.suite.retention.probes,
                                     Path(self.suite.source_dir) if self.suite.source_dir else None,
                                     model=self.model_name)
                snap = take_snapshot(generate, probes, model="base", fingerprint=None)
                self.cases += snapshot_cases(snap, self.suite.retention.tags, self.suite.retention.exclude_tags)
            self.base_run = run_cases(generate, self.suite, self.cases, model="base")
        return (f"knowledge suite {self.suite.name}: base {_fmt_scores(self.base_run.scores)}; stopping at "
                f"efficacy >= {self.target:.0%}")

    def check(self, model, tokenizer, device: str, step: int, epoch: float) -> tuple[str, bool, bool]:
        """(scores as a line, improved, reached target) at `step`."""
        run = run_cases(self._generate(model, tokenizer, device), self.suite, self.cases, model="adapter")
        score_run(run, self.base_run)
        entry = {"step": step, **run.scores}
        self.history.append(entry)
        improved = self.best is None or _rank(run.scores) > _rank(self.best)
        if improved:
            self.best = entry
        efficacy = run.scores.get("efficacy")
        reached = efficacy is not None and efficacy >= self.target
        line = _fmt_scores(run.scores) + (f"; efficacy reached {self.target:.0%}, stopping" if reached else "")
        return line, improved, reached

    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    def summary(self, stopped_at: int | None) -> dict:
        return {"suite": self.suite.name, "target_efficacy": self.target,
                "base": self.base_run.scores if self.base_run else None, "evals": self.history,
                "best": self.best, "stopped_early_at": stopped_at}
