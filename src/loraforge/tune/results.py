"""results.jsonl rows (the seed's fields plus ours), exported from a study, and the report with its plots."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from loraforge import paths
from loraforge.tune.spec import TuneSpec
from loraforge.tune.study import is_fit

# The seed's per-trial record (../seeds/configs/sweep_space_004.json), in its order.
SEED_FIELDS = ("timestamp", "domain", "rank", "alpha", "weight_decay", "learning_rate", "accuracy", "latency",
               "cost", "device", "training_time_seconds")


def trial_row(spec: TuneSpec, ref, number: int, params: dict[str, Any], outcome, *, state: str,
              device_seconds: float, worker: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One trial's row. `latency` is training seconds per epoch (evaluation excluded, as in the seed);
    `cost` is the device-seconds the whole trial held the device (loading, training, evaluation) times
    `price_per_hour`."""
    config = outcome.config
    epochs = max(1, outcome.epochs_run)
    return {
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "domain": ref.data,
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "weight_decay": config.get("weight_decay", 0.0),
        "learning_rate": config.get("learning_rate"),
        "accuracy": round(outcome.accuracy, 6),
        "latency": round(outcome.training_seconds / epochs, 4),
        "cost": round(device_seconds * spec.price_per_hour / 3600, 6),
        "device": outcome.device,
        "training_time_seconds": outcome.training_seconds,
        "study": ref.name, "trial": number, "state": state, "strategy": spec.strategy, "params": params,
        "seed": spec.seed, "config": config, "test_accuracy": outcome.test_accuracy, "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run, "epoch_accuracy": outcome.epoch_accuracy,
        "adapter_bytes": outcome.adapter_bytes, "device_seconds": round(device_seconds, 3), "worker": worker,
        **(extra or {}),
    }


def append_row(path: Path, row: dict) -> None:
    """Append one line with a single write on an O_APPEND descriptor (workers on one machine share the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def study_rows(study) -> list[dict]:
    """Every trial that ran (or was killed while running), by number; skipped and queued ones left out."""
    from optuna.trial import TrialState

    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.WAITING or t.user_attrs.get("skipped") or is_fit(t):
            continue
        row = t.user_attrs.get("row")
        if row is None:  # failed or killed before it finished: what is known
            row = {"study": study.study_name, "domain": study.user_attrs.get("data"), "trial": t.number,
                   "params": t.params, "worker": t.user_attrs.get("worker")}
        state = {"COMPLETE": "complete", "PRUNED": "pruned"}.get(t.state.name, t.state.name.lower())
        rows.append({**row, "state": state})
    return rows


def export_results(study, out_dir: Path) -> list[dict]:
    rows = study_rows(study)
    paths.atomic_write_text(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _importance(study, spec: TuneSpec) -> dict[str, float] | None:
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if len(complete) < 3:
        return None
    try:
        target = (lambda t: t.values[0]) if len(spec.objectives) > 1 else None
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=spec.seed)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, target=target))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None  # too few distinct values to say


def _plots(rows: list[dict], importance: dict | None, out_dir: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    done = [r for r in rows if r.get("accuracy") is not None]
    if done:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [r["trial"] for r in done]
        ys = [r["accuracy"] for r in done]
        best, running = [], -1.0
        for y in ys:
            running = max(running, y)
            best.append(running)
        ax.scatter(xs, ys, s=14, color="#999", label="trial (best epoch)")
        ax.step(xs, best, where="post", color="#1f77b4", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "best_so_far.png", dpi=110)
        plt.close(fig)
        made.append("best_so_far.png")
    if importance:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importance)))
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names], color="#1f77b4")
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out_dir / "importance.png", dpi=110)
        plt.close(fig)
        made.append("importance.png")
    return made


def best_rows(rows: list[dict], spec: TuneSpec) -> list[dict]:
    """Single objective: the highest accuracy (ties: faster training). Several: the Pareto front."""
    done = [r for r in rows if r.get("state") == "complete"]
    if not done:
        return []
    if len(spec.objectives) == 1:
        return [max(done, key=lambda r: (r["accuracy"], -r["training_time_seconds"]))]
    keys = {"accuracy": lambda r: -r["accuracy"], "size": lambda r: r["adapter_bytes"],
            "time": lambda r: r["training_time_seconds"]}
    costs = [[keys[o](r) for o in spec.objectives] for r in done]

    def dominated(i: int) -> bool:
        return any(all(a <= b for a, b in zip(costs[j], costs[i])) and costs[j] != costs[i] for j in range(len(done)))

    return sorted((r for i, r in enumerate(done) if not dominated(i)), key=lambda r: -r["accuracy"])


def write_report(study, spec: TuneSpec, out_dir: Path, *, train_file: str | None = None, top: int = 5) -> dict:
    """report.md, best_config.json and the PNG plots; returns a summary for the CLI and the API."""
    rows = export_results(study, out_dir)
    from loraforge.tune.study import budget_of, trials_by_state

    importance = _importance(study, spec)
    title = f"{study.study_name} ({spec.strategy})"
    plots = _plots(rows, importance, out_dir, title)
    best = best_rows(rows, spec)
    complete = sorted((r for r in rows if r.get("state") == "complete"), key=lambda r: -r["accuracy"])
    spent = sum(r.get("device_seconds") or 0 for r in rows)
    summary = {"study": study.study_name, "domain": study.user_attrs.get("data"), "strategy": spec.strategy,
               "objectives": spec.objectives, "trials": trials_by_state(study), "budget": budget_of(spec),
               "device_seconds": round(spent, 1), "best": best, "importance": importance, "plots": plots}
    lines = [f"# Tuning report: {study.study_name}", "",
             f"Strategy `{spec.strategy}`, objectives {', '.join(spec.objectives)}, {spec.epochs} epochs per trial, "
             f"seed {spec.seed}. Trials: " + ", ".join(f"{v} {k}" for k, v in summary["trials"].items()) +
             f". Device time: {spent:.0f} s (loading, training and evaluation).", ""]
    if best:
        b = best[0]
        lines += [f"**Best**: validation {b['accuracy']:.1%}" +
                  (f", test {b['test_accuracy']:.1%}" if b.get("test_accuracy") is not None else "") +
                  f" (trial {b['trial']}, epoch {b['best_epoch']}): {_fmt_params(b['params'])}", ""]
        if train_file:
            config = {"name": f"{study.study_name}-best", "training_data": train_file, **b["config"],
                      "_tuned_by": f"loraforge tune, study {study.study_name}, trial {b['trial']}"}
            paths.atomic_write_json(out_dir / "best_config.json", config)
            summary["best_config"] = "best_config.json"
            lines += [f"Train it into the store: `loraforge train {out_dir / 'best_config.json'}`", ""]
    if len(best) > 1:
        lines += ["Pareto front (" + ", ".join(spec.objectives) + "):", ""]
        lines += [f"- trial {r['trial']}: {r['accuracy']:.1%}, {r['adapter_bytes']:,} B, "
                  f"{r['training_time_seconds']:.1f} s — {_fmt_params(r['params'])}" for r in best]
        lines.append("")
    lines += [f"## Top {min(top, len(complete))}", "", "| trial | validation | test | best epoch | train s | "
              "bytes | params |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in complete[:top]:
        test = f"{r['test_accuracy']:.1%}" if r.get("test_accuracy") is not None else "—"
        lines.append(f"| {r['trial']} | {r['accuracy']:.1%} | {test} | {r['best_epoch']} | "
                     f"{r['training_time_seconds']:.1f} | {r['adapter_bytes']:,} | {_fmt_params(r['params'])} |")
    lines.append("")
    if importance:
        lines += ["## Parameter importance (fANOVA on completed trials)", ""]
        lines += [f"- {k}: {v:.2f}" for k, v in importance.items()]
        lines.append("")
    prediction = study.user_attrs.get("prediction")
    if prediction:
        verified = [r for r in rows if r.get("phase") == "verify" and r.get("accuracy") is not None]
        summary["prediction"] = {**prediction, "verified": [
            {"trial": r["trial"], "predicted": r.get("predicted"), "measured": r["accuracy"]} for r in verified]}
        lines += ["## Predicted versus measured (`predict`)", "",
                  f"Surrogate `{prediction['surrogate']}` fitted on {prediction['samples']} sampled configurations; "
                  f"its leave-one-out mean absolute error on them was {prediction['loo_mae']:.3f}. It scored all "
                  f"{prediction['grid']} grid configurations; the top {len(verified)} untested were trained. "
                  f"Trained {prediction['samples'] + len(verified)} of {prediction['grid']} configurations "
                  f"({(prediction['samples'] + len(verified)) / prediction['grid']:.0%}). Whether the best of those "
                  "matches the best of the whole grid is measured in bench/tune_predict.py, not assumed.", "",
                  "| trial | predicted | measured | params |", "|---:|---:|---:|---|"]
        lines += [f"| {r['trial']} | {r.get('predicted', 0):.1%} | {r['accuracy']:.1%} | {_fmt_params(r['params'])} |"
                  for r in verified]
        lines.append("")
    lines += [f"![best so far]({p})" for p in plots]
    paths.atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    paths.atomic_write_json(out_dir / "summary.json", summary)
    return summary
