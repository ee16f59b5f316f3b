"""`loraforge tune`: one study per domain (or one for a dataset), run by N local workers, then the report.

Files, per study, under `LORAFORGE_HOME/tuning/NAME/DATA/` (or `--out`): `study.db` (the Optuna study,
unless `--storage` names a shared database), `results.jsonl`, `report.md`, `summary.json`,
`best_config.json` with `train.jsonl`, and the PNG plots. Running the same spec again resumes.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

from loraforge import paths
from loraforge.tune.objective import TuneData, dataset_data, domain_data
from loraforge.tune.spec import TuneSpec
from loraforge.tune.study import (QUEUED, StudyRef, open_study, requeue_lost_fit, study_name, trials_by_state,
                                  waiting, work)


def tuning_root() -> Path:
    return paths.home() / "tuning"


def study_refs(spec: TuneSpec, *, out: Path | None, storage: str | None) -> list[StudyRef]:
    root = out if out is not None else paths.inside(tuning_root(), spec.name)
    refs = []
    for data in spec.domains or [Path(spec.dataset).stem]:
        out_dir = root / data if spec.domains else root
        url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
        refs.append(StudyRef(study_name(spec, data), url, out_dir, data))
    return refs


def load_data(spec: TuneSpec, ref: StudyRef, base_dir: Path | None) -> TuneData:
    return domain_data(spec, ref.data) if spec.domains else dataset_data(spec, base_dir or Path.cwd())


def _worker_process(spec_json: dict, ref: tuple, base_dir: str | None, deadline: float | None) -> None:
    spec = TuneSpec(**spec_json)
    study_ref = StudyRef(ref[0], ref[1], Path(ref[2]), ref[3])
    data = load_data(spec, study_ref, Path(base_dir) if base_dir else None)
    work(spec, study_ref, data, deadline=deadline, on_trial=_print_row)


def _print_row(row: dict) -> None:
    test = f", test {row['test_accuracy']:.0%}" if row.get("test_accuracy") is not None else ""
    print(f"{row['study']} trial {row['trial']} {row['state']}: validation {row['accuracy']:.0%}{test}, "
          f"{row['training_time_seconds']:.1f} s training — "
          + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()),
          flush=True)


def _run_workers(spec: TuneSpec, ref: StudyRef, data: TuneData, workers: int, deadline: float | None,
                 base_dir: Path | None, on_trial: Callable[[dict], None], log: Callable[[str], None],
                 should_stop: Callable[[], bool]) -> None:
    if workers <= 1:
        work(spec, ref, data, deadline=deadline, on_trial=on_trial, should_stop=should_stop)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch state; the same on every platform
    procs = [context.Process(target=_worker_process, daemon=False,
                             args=(spec.model_dump(mode="json"), (ref.name, ref.storage, str(ref.out_dir), ref.data),
                                   str(base_dir) if base_dir else None, deadline)) for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        log(f"{len(failed)} of {workers} workers exited with an error (codes {failed}); their trials are failed "
            "and the study can be resumed")


def _settle(study, spec: TuneSpec, deadline: float | None) -> None:
    """Wait for trials still running elsewhere, or dead (stale heartbeat: failed, queued again)."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if deadline is not None and time.time() >= deadline:
            return
        fail_stale_trials(study)
        time.sleep(min(2.0, spec.heartbeat_seconds))


def run_tuning(spec: TuneSpec, *, base_dir: Path | None = None, out: Path | None = None, storage: str | None = None,
               workers: int | None = None, create_only: bool = False,
               on_trial: Callable[[dict], None] = _print_row, log: Callable[[str], None] = print,
               should_stop: Callable[[], bool] = lambda: False) -> list[dict]:
    """Create or resume each study, run it to its budget, write its results and report. Returns the summaries."""
    from loraforge.tune.results import write_report

    workers = spec.workers if workers is None else workers
    deadline = time.time() + spec.minutes * 60 if spec.minutes else None
    summaries = []
    for ref in study_refs(spec, out=out, storage=storage):
        ref.out_dir.mkdir(parents=True, exist_ok=True)
        data = load_data(spec, ref, base_dir)
        study = open_study(spec, ref, create=True, base_dir=base_dir)
        train_file = _write_train_file(ref, data, spec, base_dir)
        if create_only:
            log(f"study {ref.name} ready in {ref.storage.split('@')[-1]}: start workers with "
                f"`loraforge tune worker {ref.name} --storage URL`")
            summaries.append({"study": ref.name, "trials": trials_by_state(study)})
            continue
        log(f"study {ref.name}: {spec.strategy}, {workers} worker(s), results in {ref.out_dir}")
        for _phase in range(3):  # settle-and-retry: a killed trial's configuration comes back once
            _run_workers(spec, ref, data, workers, deadline, base_dir, on_trial, log, should_stop)
            if should_stop():
                break
            _settle(study, spec, deadline)
            if spec.strategy == "predict":
                requeue_lost_fit(study)
            if spec.strategy in QUEUED and waiting(study) and (deadline is None or time.time() < deadline):
                continue
            break
        summary = write_report(study, spec, ref.out_dir, train_file=train_file)
        summaries.append(summary)
    return summaries


def _write_train_file(ref: StudyRef, data: TuneData, spec: TuneSpec, base_dir: Path | None) -> str:
    """The training data the best config trains on: the domain's train split (a dataset: its own file)."""
    if not spec.domains:
        return str(((base_dir or Path.cwd()) / spec.dataset).resolve())
    target = ref.out_dir / "train.jsonl"
    paths.atomic_write_text(target, "".join(json.dumps({"messages": e.messages}) + "\n" for e in data.train))
    return str(target.resolve())


def run_worker(study: str, storage: str, *, out: Path | None = None, base_dir: Path | None = None,
               on_trial: Callable[[dict], None] = _print_row, log: Callable[[str], None] = print) -> int:
    """`loraforge tune worker STUDY --storage URL`: take trials of an existing study until it is done."""
    import optuna

    from loraforge.errors import ConfigError
    from loraforge.names import check_name

    check_name(study, "study")
    try:
        summary = optuna.study.get_all_study_summaries(storage=storage, include_best_trial=False)
    except Exception as exc:  # a bad URL or an unreachable server: say which, without a traceback
        raise ConfigError(f"cannot open storage: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                          field="storage") from None
    found = [s for s in summary if s.study_name == study]
    if not found:
        raise ConfigError(f"no study {study!r} in that storage (have: "
                          f"{', '.join(s.study_name for s in summary) or 'none'})", field="study")
    attrs = found[0].user_attrs
    spec = TuneSpec(**attrs["spec"])
    stored_base = attrs.get("base_dir")
    base = base_dir or (Path(stored_base) if stored_base else None)
    ref = StudyRef(study, storage, out or paths.inside(tuning_root(), "workers", study), attrs["data"])
    ref.out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(spec, ref, base)
    deadline = time.time() + spec.minutes * 60 if spec.minutes else None
    ran = work(spec, ref, data, deadline=deadline, on_trial=on_trial, log=log)
    log(f"worker done: {ran} trial(s) run here")
    return ran


def report_study(study: str, storage: str, *, out: Path) -> dict:
    """`loraforge tune report STUDY --storage URL`: results.jsonl and the report from any storage."""
    import optuna

    from loraforge.tune.results import write_report

    loaded = optuna.load_study(study_name=study, storage=storage)
    spec = TuneSpec(**loaded.user_attrs["spec"])
    out.mkdir(parents=True, exist_ok=True)
    return write_report(loaded, spec, out)
