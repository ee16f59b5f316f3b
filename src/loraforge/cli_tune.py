"""`loraforge tune`: SPEC runs (or resumes) a study; `tune worker STUDY` joins one; `tune report STUDY` exports it."""

from __future__ import annotations

import argparse
from pathlib import Path

from loraforge.errors import ConfigError


def _overrides(args) -> dict:
    return {k: v for k, v in (("strategy", args.strategy), ("trials", args.trials), ("minutes", args.minutes))
            if v is not None}


def cmd_tune(args) -> int:
    from loraforge.tune.runner import report_study, run_tuning, run_worker
    from loraforge.tune.spec import load_tune_spec, parse_tune_spec

    if args.what in ("worker", "report"):
        if not args.study or not args.storage:
            raise ConfigError(f"usage: loraforge tune {args.what} STUDY --storage URL", field="study")
        if args.what == "worker":
            run_worker(args.study, args.storage, out=Path(args.out) if args.out else None,
                       base_dir=Path(args.base_dir) if args.base_dir else None)
            return 0
        summary = report_study(args.study, args.storage, out=Path(args.out or "."))
        print(f"{summary['study']}: results.jsonl and report.md written to {args.out or '.'}")
        return 0
    if args.study:
        raise ConfigError(f"unexpected argument {args.study!r} (loraforge tune SPEC [options])")
    spec, base_dir = load_tune_spec(Path(args.what), name=args.name)
    if _overrides(args):
        spec = parse_tune_spec({**spec.model_dump(mode="json"), **_overrides(args)}, source=args.what)
    summaries = run_tuning(spec, base_dir=base_dir, out=Path(args.out) if args.out else None, storage=args.storage,
                           workers=args.workers, create_only=args.create_only)
    for s in summaries:
        if args.create_only:
            continue
        best = s["best"][0] if s.get("best") else None
        line = f"{s['study']}: " + ", ".join(f"{v} {k}" for k, v in s["trials"].items())
        if best:
            test = f", test {best['test_accuracy']:.1%}" if best.get("test_accuracy") is not None else ""
            line += (f"; best validation {best['accuracy']:.1%}{test} (trial {best['trial']}): "
                     + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in best["params"].items()))
        print(line)
    return 0 if all(s.get("best") or args.create_only for s in summaries) else 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="auto-tune LoRA hyperparameters: `tune SPEC`, `tune worker STUDY --storage URL`, "
                     "`tune report STUDY --storage URL`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Strategies: grid, random, tpe, gp, tpe+hyperband, predict. Results go to "
                    "LORAFORGE_HOME/tuning/NAME/DOMAIN/ (results.jsonl, report.md, plots, best_config.json); "
                    "running the same spec again resumes.")
    p.add_argument("what", metavar="SPEC|worker|report", help="a tuning spec (YAML/JSON; the seed's sweep space "
                   "works as is), or worker / report")
    p.add_argument("study", nargs="?", help="the study name, for worker and report")
    p.add_argument("--name", help="study name prefix (default: the spec's name)")
    p.add_argument("--strategy", choices=["grid", "random", "tpe", "gp", "tpe+hyperband", "predict"])
    p.add_argument("--trials", type=int, help="budget: finished trials")
    p.add_argument("--minutes", type=float, help="budget: wall time of this run")
    p.add_argument("--workers", type=int, help="worker processes on this machine (default: the spec's, 1)")
    p.add_argument("--storage", help="shared Optuna storage, e.g. postgresql://user:pass@host/db (default: a "
                   "SQLite file in the study folder)")
    p.add_argument("--out", help="folder for results (default: LORAFORGE_HOME/tuning/NAME)")
    p.add_argument("--base-dir", help="worker: folder the spec's dataset and suite paths are relative to")
    p.add_argument("--create-only", action="store_true", help="create the study and its queue, run nothing "
                   "(workers on other machines take the trials)")
    p.set_defaults(func=cmd_tune)

