"""Studies: Optuna storage, strategies, the budget, and the worker loop that several processes or machines share.

How trials are handed out, whoever runs them:

- `grid` and `predict` put their configurations in the study's queue (Optuna's WAITING trials, popped
  atomically by the storage); a worker runs queued trials only and stops when the queue is empty, so
  two workers never run the same configuration.
- `random`, `tpe`, `gp` and `tpe+hyperband` sample. Before it starts, a trial counts the trials numbered
  below it that are running or finished (failed ones excepted); when that reaches the budget it is
  recorded as skipped and not run. Trial numbers are unique in the storage, so workers racing for the
  last slot never overshoot the budget.
- `predict` queues one more entry after its samples: the fit. The worker that pops it waits (its
  heartbeat alive) for samples still running elsewhere, then fits the surrogate and queues the
  verification trials. A sample back in the queue (its worker died), the deadline or a stop makes it put
  the fit back at the end of the queue instead. There is only ever one fit entry, so the verification is
  queued exactly once, by whichever worker holds it: a coordinator, its local workers, or
  `loraforge tune worker` processes on other machines.
- A worker that dies stops sending heartbeats; the next worker to start a trial marks its trial failed
  and puts its configuration back in the queue (once), so the study goes on and resumes where it was.
"""

from __future__ import annotations

import os
import random
import warnings
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError
from loraforge.names import check_name
from loraforge.tune.spec import TuneSpec

QUEUED = ("grid", "predict")


@dataclass(frozen=True)
class StudyRef:
    """Where one study lives: its name, its storage URL and the local folder for its files."""

    name: str
    storage: str
    out_dir: Path
    data: str  # the domain (or dataset stem) it tunes


def study_name(spec: TuneSpec, data: str) -> str:
    return check_name(f"{spec.name}-{data}" if spec.domains else spec.name, "study name")


def make_storage(url: str, heartbeat_seconds: float):
    """An RDB storage with heartbeats: SQLite file for one machine, PostgreSQL (or MySQL) for several."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    interval = max(1, round(heartbeat_seconds))
    try:
        with _quiet_experimental():
            return RDBStorage(url, heartbeat_interval=interval, grace_period=max(2 * interval, interval + 2),
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                              **kwargs)
    except ImportError:
        raise ConfigError(f"storage {url.split(':', 1)[0]}: its database driver is not installed (PostgreSQL: "
                          "pip install 'loraforge[postgres]')", field="storage") from None
    except Exception as exc:  # a bad URL or an unreachable server: say which, never a traceback
        raise ConfigError(f"cannot open storage: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                          field="storage") from None


@contextmanager
def _quiet_experimental():
    """Optuna marks heartbeats and GPSampler experimental; the warning says nothing to our users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _startup_trials(spec: TuneSpec) -> int:
    return max(2, min(10, (spec.trials or 30) // 3))


def make_sampler(spec: TuneSpec):
    import optuna

    if spec.strategy in ("tpe", "tpe+hyperband"):
        return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=_startup_trials(spec))
    if spec.strategy == "gp":
        with _quiet_experimental():
            return optuna.samplers.GPSampler(seed=spec.seed, n_startup_trials=_startup_trials(spec))
    return optuna.samplers.RandomSampler(seed=spec.seed)  # random, and the queued strategies' fallback


def make_pruner(spec: TuneSpec):
    import optuna

    if spec.strategy == "tpe+hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def budget_of(spec: TuneSpec) -> int:
    """Trials to finish (failed ones don't count). Grid: the whole grid unless `trials` is smaller."""
    from loraforge.tune.space import grid

    if spec.strategy == "grid":
        size = len(grid(spec))
        return min(size, spec.trials) if spec.trials else size
    if spec.strategy == "predict":
        return spec.predict.samples + spec.predict.verify
    if spec.trials is None and spec.minutes is None:
        raise ConfigError(f"strategy {spec.strategy} needs a budget: trials and/or minutes", field="trials")
    return spec.trials or 10**9


def _comparable(spec: TuneSpec) -> dict:
    """The parts of a spec that must match to resume a study (budget and workers may change)."""
    return spec.model_dump(mode="json", exclude={"trials", "minutes", "workers", "heartbeat_seconds"})


def open_study(spec: TuneSpec, ref: StudyRef, *, create: bool, base_dir: Path | None = None):
    """Create the study (and its queue) or load it; a study tuned with another spec is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says what matters
    storage = make_storage(ref.storage, spec.heartbeat_seconds)
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    try:
        study = optuna.load_study(study_name=ref.name, storage=storage, sampler=sampler, pruner=pruner)
        existed = True
    except KeyError:
        if not create:
            raise ConfigError(f"no study {ref.name!r} in that storage", field="study") from None
        study = optuna.create_study(study_name=ref.name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=spec.directions, load_if_exists=True)
        existed = bool(study.user_attrs.get("spec"))
    if existed:
        stored = study.user_attrs.get("spec")
        if create and stored is not None and _comparable(spec) != _comparable(TuneSpec(**stored)):
            raise ConfigError(f"study {ref.name!r} exists with a different spec; choose another name (--name) "
                              "or remove its folder to start over", field="name")
        return study
    study.set_user_attr("spec", spec.model_dump(mode="json"))
    study.set_user_attr("data", ref.data)
    study.set_user_attr("base_dir", str(base_dir) if base_dir else None)
    study.set_user_attr("created", _now())
    if spec.strategy == "grid":
        enqueue_grid(study, spec)
    elif spec.strategy == "predict":
        enqueue_samples(study, spec)
    return study


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def enqueue_grid(study, spec: TuneSpec) -> None:
    from loraforge.tune.space import grid

    points = grid(spec)
    random.Random(spec.seed).shuffle(points)  # a budget smaller than the grid takes an unbiased subset
    for point in points[:budget_of(spec)]:
        study.enqueue_trial(point, user_attrs={"queued": "grid"})


def enqueue_samples(study, spec: TuneSpec) -> None:
    from loraforge.tune.space import grid

    points = grid(spec)
    if len(points) <= spec.predict.samples + spec.predict.verify:
        raise ConfigError(f"predict: the grid has only {len(points)} configurations; sampling "
                          f"{spec.predict.samples} and verifying {spec.predict.verify} would test them all — "
                          "use strategy grid", field="predict.samples")
    for point in random.Random(spec.seed).sample(points, spec.predict.samples):
        study.enqueue_trial(point, user_attrs={"queued": "predict", "phase": "sample"})
    enqueue_fit(study)


FIT = {"queued": "predict", "phase": "fit"}


def enqueue_fit(study) -> None:
    """The predict study's one fit entry, at the end of the queue (see the module notes)."""
    study.enqueue_trial({}, user_attrs=FIT)


def is_fit(trial) -> bool:
    return trial.user_attrs.get("phase") == "fit"


def requeue_lost_fit(study) -> bool:
    """Queue the fit again if it is gone before it queued the verification: its holder was killed twice, or
    the study predates the fit entry. Only for a coordinator whose study has settled (nothing running)."""
    from optuna.trial import TrialState

    if study.user_attrs.get("prediction"):
        return False
    fits = sorted((t for t in study.get_trials(deepcopy=False) if is_fit(t)), key=lambda t: t.number)
    if fits and fits[-1].state != TrialState.FAIL:
        return False
    enqueue_fit(study)
    return True


def _take_fit(study, spec: TuneSpec, *, deadline: float | None, should_stop: Callable[[], bool]) -> str:
    """This worker holds the fit: wait for sampled trials running elsewhere, then queue the verification.

    A sampled trial back in the queue (its worker died) is work this worker can do, so the fit is passed
    on behind it instead of waiting for it; so is a fit that runs into the deadline or a stop."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from loraforge.tune.predict import enqueue_verification

    while not study.user_attrs.get("prediction"):
        with _quiet_experimental():
            fail_stale_trials(study)  # a dead sample's configuration goes back in the queue before we count
        states = [t.state for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
                  if t.user_attrs.get("phase") == "sample"]
        if not states:
            prediction = enqueue_verification(study, spec)
            if prediction is None:
                return "fewer than 3 sampled trials completed: nothing to fit"
            return (f"fit {prediction['surrogate']} on {prediction['samples']} samples (leave-one-out error "
                    f"{prediction['loo_mae']:.3f}); queued the top {prediction['queued']} of {prediction['grid']}")
        if TrialState.WAITING in states or should_stop() or (deadline is not None and time.time() >= deadline):
            enqueue_fit(study)
            return f"{len(states)} sampled trial(s) still to run; the fit went back in the queue"
        time.sleep(min(2.0, spec.heartbeat_seconds))
    return "the verification was already queued"


# ---- the worker loop -------------------------------------------------------------------------------------------
def _counted(study, before: int | None = None) -> int:
    """Trials running or finished (failed and skipped ones not counted), optionally numbered below `before`."""
    from optuna.trial import TrialState

    live = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in live and not t.user_attrs.get("skipped") and (before is None or t.number < before))


def waiting(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _failed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def work(spec: TuneSpec, ref: StudyRef, data, *, deadline: float | None = None,
         on_trial: Callable[[dict], None] | None = None, log: Callable[[str], None] = lambda m: None,
         should_stop: Callable[[], bool] = lambda: False) -> int:
    """Run trials of the study until its budget, its queue or `deadline` (time.time()) ends. Returns trials run."""
    import optuna
    import torch

    from loraforge.tune.objective import run_trial
    from loraforge.tune.results import append_row, trial_row
    from loraforge.tune.space import suggest

    study = open_study(spec, ref, create=False)
    budget = budget_of(spec)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran = 0

    def objective(trial):
        if is_fit(trial):
            outcome = _take_fit(study, spec, deadline=deadline, should_stop=should_stop)
            trial.set_user_attr("skipped", outcome)
            log(outcome)
            raise optuna.TrialPruned()
        queued = trial.user_attrs.get("queued")
        if spec.strategy in QUEUED and not queued:
            trial.set_user_attr("skipped", "the queue was empty when this trial started")
            raise optuna.TrialPruned()
        if _counted(study, before=trial.number) >= budget:
            trial.set_user_attr("skipped", "the budget was reached when this trial started")
            raise optuna.TrialPruned()
        params = suggest(trial, spec)
        started = time.perf_counter()
        trial.set_user_attr("worker", worker)

        def report(accuracy: float, epoch: int) -> None:
            if len(spec.objectives) == 1:
                trial.report(accuracy, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        outcome = run_trial(spec, params, data, work_dir=ref.out_dir / "trials" / f"{trial.number}-{os.getpid()}",
                            report=report, log=log)
        row = trial_row(spec, ref, trial.number, params, outcome, state="pruned" if outcome.pruned else "complete",
                        device_seconds=time.perf_counter() - started, worker=worker,
                        extra={k: v for k, v in trial.user_attrs.items() if k in ("phase", "predicted")})
        trial.set_user_attr("row", row)
        append_row(ref.out_dir / "results.jsonl", row)
        if on_trial:
            on_trial(row)
        if outcome.pruned:
            raise optuna.TrialPruned()
        values = {"accuracy": outcome.accuracy, "size": outcome.adapter_bytes, "time": outcome.training_seconds}
        return [values[o] for o in spec.objectives] if len(spec.objectives) > 1 else outcome.accuracy

    oom = (MemoryError, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else (MemoryError,)
    while not should_stop():
        if deadline is not None and time.time() >= deadline:
            log("time budget reached")
            break
        if spec.strategy in QUEUED and waiting(study) == 0:
            break
        if _counted(study) >= budget:
            break
        if _failed(study) >= max(3, budget):
            raise ConfigError(f"study {ref.name}: {_failed(study)} trials failed; see the log of the last one")
        study.optimize(objective, n_trials=1, catch=oom, gc_after_trial=True)
        ran += 1
    return ran


def trials_by_state(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if is_fit(t):
            continue  # bookkeeping, not a configuration
        key = "skipped" if t.user_attrs.get("skipped") else t.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    return counts
