"""One tuning trial: train an adapter with the trial's parameters and score it, epoch by epoch.

The trial's score is the validation accuracy of its best epoch (the recipe keeps those weights, and
the test split, when there is one, is scored once on them). Validation runs after every epoch through
`EpochScorer`, a `train.recipe.TrainingMonitor`, which also hands each epoch's accuracy to the pruner.
The adapter is written to a scratch folder and removed: a trial's result is its row, and the best
config is trained again into the store by `loraforge train` (so the registry keeps full provenance).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge import paths
from loraforge.data import Example, load_examples, load_examples_from_file
from loraforge.tune.spec import TuneSpec


@dataclass(frozen=True)
class Probe:
    """One scored prompt: a chat and the check its answer must pass."""

    chat: list[dict]
    check: Callable[[str], bool]


@dataclass
class TuneData:
    name: str
    train: list[Example]
    validation: list[Probe]
    test: list[Probe] = field(default_factory=list)


def domain_data(spec: TuneSpec, domain: str) -> TuneData:
    from loraforge.tune.domains import splits

    parts = splits(domain, spec.seed, train=spec.train_size, validation=spec.validation_size, test=spec.test_size)
    records = [{"instruction": t.prompt, "output": t.answer} for t in parts["train"]]

    def probes(tasks):
        return [Probe([{"role": "user", "content": t.prompt}], t.passes) for t in tasks]

    return TuneData(domain, load_examples(records, f"domain {domain}"), probes(parts["validation"]),
                    probes(parts["test"]))


def dataset_data(spec: TuneSpec, base_dir: Path) -> TuneData:
    """The user's own task: a training file and an eval suite whose target and paraphrase cases validate.

    Relative paths are taken from the spec's folder; retention cases need the base's snapshot and are
    not part of the tuning score (run `loraforge eval` on the chosen adapter for them)."""
    from loraforge.evals.suite import resolve_suite

    train = load_examples_from_file((base_dir / spec.dataset).resolve())
    suite = resolve_suite(spec.suite, base_dir, field="suite", contain=False)
    cases = [c for c in suite.cases if c.kind in ("target", "paraphrase")]
    if not cases:
        from loraforge.errors import ConfigError

        raise ConfigError(f"suite {suite.name} has no target or paraphrase cases to score tuning on", field="suite")
    return TuneData(Path(spec.dataset).stem, train, [Probe(c.chat(), c.expect.check) for c in cases])


def score(model, tokenizer, probes: list[Probe], *, device: str, max_tokens: int, batch_size: int = 32) -> float:
    """Exact-match (or suite-matcher) accuracy, greedy."""
    from loraforge.generation import batch_generate

    passed = 0
    for start in range(0, len(probes), batch_size):
        chunk = probes[start:start + batch_size]
        outputs = batch_generate(model, tokenizer, [p.chat for p in chunk], max_tokens=max_tokens, device=device)
        passed += sum(p.check(o[0]) for p, o in zip(chunk, outputs))
    return passed / len(probes) if probes else 0.0


class EpochScorer:
    """Validation accuracy after every epoch; hands it to `report(accuracy, epoch)`, which may raise
    `optuna.TrialPruned` to end the trial. Stops early at 100% (there is nothing left to gain)."""

    manifest_key = "tuning"

    def __init__(self, data: TuneData, *, max_tokens: int, report: Callable[[float, int], None]):
        self.data = data
        self.max_tokens = max_tokens
        self.report = report
        self.history: list[dict] = []
        self.best: dict | None = None
        self.eval_seconds = 0.0
        self.fit_seconds = 0.0  # wall time from the start of fitting to the last evaluation, evaluations excluded
        self._fit_started = 0.0
        self.test_accuracy: float | None = None
        self._model = self._tokenizer = self._device = None

    def eval_interval(self, steps_per_epoch: int, total_steps: int, configured: int) -> int:
        return steps_per_epoch

    def start(self, model, tokenizer, device: str) -> str:
        self._model, self._tokenizer, self._device = model, tokenizer, device
        self._fit_started = time.perf_counter()
        return f"tuning on {self.data.name}: validation accuracy ({len(self.data.validation)} tasks) after every epoch"

    def check(self, model, tokenizer, device: str, step: int, epoch: float) -> tuple[str, bool, bool]:
        started = time.perf_counter()
        accuracy = score(model, tokenizer, self.data.validation, device=device, max_tokens=self.max_tokens)
        ended = time.perf_counter()
        self.eval_seconds += ended - started
        self.fit_seconds = ended - self._fit_started - self.eval_seconds
        entry = {"epoch": round(epoch), "step": step, "accuracy": accuracy}
        self.history.append(entry)
        improved = self.best is None or accuracy > self.best["accuracy"]
        if improved:
            self.best = entry
        self.report(accuracy, entry["epoch"])
        return f"epoch {entry['epoch']}: validation accuracy {accuracy:.1%}", improved, accuracy >= 1.0

    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    def summary(self, stopped_at: int | None) -> dict:
        # Called with the best epoch's weights restored: score the held-out test split once, on them.
        if self.data.test and self._model is not None:
            self.test_accuracy = score(self._model, self._tokenizer, self.data.test, device=self._device,
                                       max_tokens=self.max_tokens)
        self._model = self._tokenizer = None
        return {"epochs": self.history, "best": self.best, "test_accuracy": self.test_accuracy,
                "stopped_early_at": stopped_at}


@dataclass
class TrialOutcome:
    accuracy: float  # best epoch's validation accuracy
    best_epoch: int | None
    epochs_run: int
    epoch_accuracy: list[float]
    test_accuracy: float | None
    training_seconds: float  # the training loop only, evaluation excluded
    adapter_bytes: int
    device: str
    pruned: bool
    config: dict[str, Any]


def train_config(spec: TuneSpec, params: dict[str, Any], name: str) -> dict[str, Any]:
    from loraforge.tune.space import training_settings

    return {"name": name, "model_name": params.get("model", spec.model), **training_settings(spec, params)}


def run_trial(spec: TuneSpec, params: dict[str, Any], data: TuneData, *, work_dir: Path,
              report: Callable[[float, int], None] = lambda accuracy, epoch: None,
              log: Callable[[str], None] = lambda message: None) -> TrialOutcome:
    """Train and score one configuration. `report` may raise `optuna.TrialPruned`: the outcome is then
    returned with `pruned=True` and the epochs scored so far."""
    import optuna

    from loraforge.config import parse_train_config
    from loraforge.device import choose_placement
    from loraforge.train.plan import plan_training
    from loraforge.train.recipe import train

    config = train_config(spec, params, "trial")
    plan = plan_training(parse_train_config(config, source="tuning trial"))
    device = choose_placement(plan.spec.training.device, plan.spec.training.precision).device
    scorer = EpochScorer(data, max_tokens=spec.max_new_tokens, report=report)
    out_dir = work_dir / "adapter"
    pruned = False
    size = plan.theoretical_min_bytes
    try:
        result = train(plan, data.train, run_dir=work_dir / "run", out_dir=out_dir, log=log, monitor=scorer)
        size = result.manifest["size"]["bytes_on_disk"]
    except optuna.TrialPruned:
        pruned = True
    finally:
        paths.remove_tree(work_dir)
        gc.collect()
    best = scorer.best
    return TrialOutcome(
        accuracy=best["accuracy"] if best else 0.0, best_epoch=best["epoch"] if best else None,
        epochs_run=len(scorer.history), epoch_accuracy=[h["accuracy"] for h in scorer.history],
        test_accuracy=scorer.test_accuracy, training_seconds=round(scorer.fit_seconds, 3),
        adapter_bytes=size, device=device, pruned=pruned, config={k: v for k, v in config.items() if k != "name"})
