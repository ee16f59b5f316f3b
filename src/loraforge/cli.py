"""The `loraforge` command line. Commands parse, call one service function, and print the answer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from loraforge import __version__, cli_adapters
from loraforge.errors import LoraforgeError


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, soft_wrap=True)


def _err(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---- helpers shared by train and validate ------------------------------------------------------------------
def _load_spec(args) -> tuple[Any, list, str]:
    """Parse the config and load its data; returns (spec, examples or [], where the data came from)."""
    from loraforge.config import load_config_file, parse_train_config
    from loraforge.data import is_file_list, load_examples, load_examples_from_file, load_examples_from_files

    config_path = Path(args.config)
    raw = load_config_file(config_path)
    spec = parse_train_config(raw, source=config_path.name, name=getattr(args, "name", None),
                              model_name=getattr(args, "model", None))
    overrides = {}
    if getattr(args, "dtype", None):
        overrides["save_dtype"] = args.dtype
    if getattr(args, "max_steps", None):
        overrides["max_steps"] = args.max_steps
    if overrides:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update=overrides)})
    if getattr(args, "trust_remote_code", False):
        spec = spec.model_copy(update={"trust_remote_code": True})
    if spec.eval_suite is not None:
        from loraforge.evals.suite import resolve_suite

        suite = resolve_suite(spec.eval_suite, config_path.parent, contain=False)
        spec = spec.model_copy(update={"eval_suite": suite.model_dump(mode="json")})
    anchors = spec.training.retention_anchors
    if anchors != "builtin":  # the user's own file, relative to the config
        resolved = str((config_path.parent / anchors).resolve())
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"retention_anchors": resolved})})
    examples: list = []
    source = "none"
    if getattr(args, "data", None):
        examples = load_examples_from_file(Path(args.data))
        source = args.data
        if spec.training_data is not None:
            spec = spec.model_copy(update={"notes": spec.notes + ("--data replaces training_data from the config",)})
    elif isinstance(spec.training_data, str):
        path = (config_path.parent / spec.training_data).resolve()
        examples = load_examples_from_file(path)
        source = spec.training_data
    elif is_file_list(spec.training_data):
        examples = load_examples_from_files([(config_path.parent / f).resolve() for f in spec.training_data])
        source = " + ".join(spec.training_data)
    elif isinstance(spec.training_data, list):
        examples = load_examples(spec.training_data, f"{config_path.name}: training_data")
        source = "inline training_data"
    return spec, examples, source


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# ---- commands ------------------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    from loraforge.train import estimate as est
    from loraforge.train.plan import plan_training

    spec, examples, source = _load_spec(args)
    plan = plan_training(spec)
    out = {"resolved": {**plan.spec.resolved(), "max_seq_length": plan.max_seq_length},
           "notes": list(plan.spec.notes), "plan": plan.summary(),
           "data": {"source": source, "examples": len(examples)}}
    data = est.tokenized(plan, examples)  # with the model's own tokenizer, where it is on this machine
    if data:
        out["data"]["trained_tokens"] = sum(d.trained_tokens for d in data)
    if args.quantization:
        plan = plan_training(plan.spec.model_copy(update={"training": plan.spec.training.model_copy(
            update={"quantization": args.quantization})}))
    estimate, arch, settings = est.for_plan(plan, data=data, device=args.device, precision=args.precision)
    limit = est.machine_memory(settings.device)
    memory = {**estimate.as_dict(), "device": settings.device, "precision": settings.precision,
              "quantization": settings.quantization, "machine_bytes": limit,
              "fits": None if limit is None else estimate.total <= limit}
    if limit is not None and estimate.total > limit:
        memory["fixes"] = [{"change": fix, "peak_bytes": peak if peak >= 0 else None}
                           for fix, peak in est.fixes(plan, estimate, settings, data)]
    out["memory"] = memory
    out["serving"] = est.estimate_serving(arch, precision=settings.precision, quantization=settings.quantization,
                                          context=plan.max_seq_length, device=settings.device)
    if data:
        from loraforge.train.calibrate import estimate_time

        fits = (limit is None or estimate.total <= limit) and args.device is None and args.precision is None
        out["time"] = estimate_time(plan, examples, data, measure=fits and not args.no_calibrate,
                                    forward_tokens=estimate.forward_tokens,
                                    log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_validation(out, plan)
    return 0


def _print_validation(out: dict, plan) -> None:
    from loraforge.train.estimate import gib

    console = _console()
    p, m = out["plan"], out["memory"]
    console.print(f"[bold]{out['resolved']['name']}[/bold] on {p['model']['requested']} ({p['model']['id']}, "
                  f"{p['model']['parameters']:,} parameters), {m['device']} {m['precision']}"
                  + (f" {m['quantization']}" if m["quantization"] else ""))
    for note in out["notes"]:
        console.print(f"  note: {note}")
    console.print(f"adapter        {p['lora_parameters']:,} LoRA parameters on {p['adapted_modules']} layers = "
                  f"{_fmt_bytes(p['theoretical_min_bytes'])} ({out['resolved']['save_dtype']})")
    data = out["data"]
    console.print(f"data           {data['examples']} examples from {data['source']}"
                  + (f", {data['trained_tokens']:,} answer tokens" if "trained_tokens" in data else ""))
    fits = {True: "[green]fits[/green]", False: "[red]does not fit[/red]", None: "machine memory unknown"}[m["fits"]]
    machine = f" of {gib(m['machine_bytes'])}" if m["machine_bytes"] else ""
    console.print(f"peak memory    {gib(m['peak_bytes'])} at {m['peak_phase']}{machine}: {fits} "
                  f"(largest forward {m['forward_rows']} x {m['forward_tokens']} tokens)")
    for term, value in m["terms"].items():
        console.print(f"  {term.replace('_', ' '):<22} {gib(value):>10}")
    if m["loading_bytes"]:
        console.print(f"  {'loading the base':<22} {gib(m['loading_bytes']):>10}  (a peak of its own, before training)")
    for fix in m.get("fixes", []):
        peak = gib(fix["peak_bytes"]) if fix["peak_bytes"] is not None else "?"
        console.print(f"  fix: {fix['change']:<28} -> {peak}")
    s = out["serving"]
    console.print(f"serving        {gib(s['terms']['weights'])} weights + {gib(s['terms']['kv_cache_per_sequence'])} "
                  f"KV cache per sequence of {s['context']} tokens")
    t = out.get("time")
    if t is None:
        console.print("time           give the data (training_data or --data) to estimate it")
    elif t["seconds"] is None:
        console.print(f"time           {t['planned_tokens']:,} tokens planned; no speed measured for these settings "
                      "on this machine (drop --no-calibrate to measure it)")
    else:
        console.print(f"time           {_fmt_seconds(t['seconds'])}: {t['planned_tokens']:,} tokens x "
                      f"{t['seconds_per_token'] * 1000:.2f} ms per token ({t['calibrated']}, {t['source']})")


def _fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_train(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from loraforge.pipeline import discard_run, train_into_store, unfinished_run
    from loraforge.store import Store
    from loraforge.train.plan import plan_training

    console = _console()
    spec, examples, source = _load_spec(args)
    if not examples:
        raise LoraforgeError("no training data: give --data FILE or training_data in the config",
                             field="training_data")
    plan = plan_training(spec)
    if args.force:
        plan = plan_training(spec.model_copy(update={"force": True}))
    from loraforge.train.estimate import refusal, tokenized

    if (why := refusal(plan, tokenized(plan, examples))) is not None:
        from loraforge.errors import InsufficientMemory

        raise InsufficientMemory(why.replace("Set force: true", "Add --force (or force: true in the config)"), field="force")
    store = Store()
    run_id = spec.name
    step = unfinished_run(store, run_id)
    if step is not None and not args.resume:
        if not args.fresh:
            raise LoraforgeError(f"an unfinished run of {spec.name!r} stopped at step {step}: "
                                 "add --resume to continue it, or --fresh to start over", field="resume")
        discard_run(store, run_id)
    console.print(f"[bold]training[/bold] {spec.name} on {plan.model.requested} ({plan.model.id}) "
                  f"with {len(examples)} examples from {source}")

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[tps]} tok/s"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=args.quiet) as bar:
        task = bar.add_task("train", total=None, loss="-", lr="-", tps="-")

        def on_progress(p) -> None:
            bar.update(task, completed=p.step, total=p.total_steps, loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}",
                       tps=f"{p.tokens_per_s:.0f}")

        version, result = train_into_store(store, plan, examples, run_id=run_id, resume=args.resume,
                                           on_progress=on_progress, log=lambda m: bar.console.print(m))
    size = result.manifest["size"]
    training = result.manifest["training"]
    console.print(f"[bold green]done[/bold green]: adapter {version.ref} ({version.status})")
    rows = [
        ("steps", f"{training['steps']} in {training['seconds']:.1f} s on {training['device']} "
                  f"({training['precision']})"),
        ("loss", f"{training['first_loss']:.4f} (first step) -> {training['final_loss']:.4f} (last step)"),
        ("trainable parameters", f"{size['trainable_parameters']:,}"),
        ("adapter file", f"{size['bytes_on_disk']:,} bytes ({_fmt_bytes(size['bytes_on_disk'])}, "
                         f"{size['dtype']})"),
        ("theoretical minimum", f"{size['theoretical_min_bytes']:,} bytes + {size['metadata_bytes']:,} "
                                f"bytes of metadata"),
        ("stored at", str(version.path)),
    ]
    for key, value in rows:
        console.print(f"  {key:<22} {value}")
    return 0


def cmd_models_list(args) -> int:
    from loraforge.models import DEFAULT_MODEL
    from loraforge.models.resolve import available_models

    console = _console()
    console.print(f"{'NAME':<26} {'READY':<6} {'SOURCE':<50} STATUS")
    for row in available_models():
        marker = " (default)" if row["id"] == DEFAULT_MODEL else ""
        console.print(f"{row['id'] + marker:<26} {'yes' if row['ready'] else 'no':<6} {row['source']:<50} "
                      f"{row['status']}")
    return 0


def cmd_models_import(args) -> int:
    """Convert a GGUF file or an Ollama model once, so training and serving start at once."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from loraforge.models import gguf, resolve_base_model
    from loraforge.models.resolve import gguf_source

    source = gguf_source(resolve_base_model(args.source))
    if source is None:
        raise LoraforgeError(f"{args.source!r} is not a GGUF model: models import takes a .gguf file, an "
                             "ollama: reference, or a catalog model shipped as GGUF (models list)", field="source")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn()) as bar:
        task = bar.add_task("checking the file", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        folder = gguf.import_gguf(source[0], expected_sha256=source[1], progress=progress)
    info = json.loads((folder / gguf.MANIFEST).read_text())
    print(f"{args.source}: {info['architecture']}, {info['parameters']:,} parameters "
          f"({', '.join(info['tensor_types'])} de-quantized to {info['dtype']}), source sha256 "
          f"{info['source']['sha256'][:16]}…")
    print(f"ready: use model_name {args.source!r} in a config, or --model {args.source}")
    return 0


def cmd_models_build(args) -> int:
    if args.model != "tiny":
        raise LoraforgeError("only the built-in model 'tiny' is built locally", field="model")
    path = build_tiny_with_progress()
    info = json.loads((path / "loraforge-tiny.json").read_text())
    print(f"tiny model ready: probe accuracy {info['probe_accuracy']:.1%}, built in {info['build_seconds']} s")
    return 0


def build_tiny_with_progress() -> Path:
    """Build the tiny model if needed, with a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from loraforge.models.tiny import build

    if build.is_built():
        return build.model_dir()
    with Progress(TextColumn("building the tiny model (first use)"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("tiny", total=None, loss="-")
        return build.build(lambda s, total, loss: bar.update(task, completed=s, total=total, loss=f"{loss:.3f}"))


def cmd_jobs_list(args) -> int:
    from loraforge.jobs import JobQueue
    from loraforge.store import Store

    for job in JobQueue(Store()).list():
        p = job.progress or {}
        step = f"{p.get('step', 0)}/{p.get('total_steps', '?')}" if p else "-"
        print(f"{job.id}  {job.status:<11} {job.adapter:<32} step {step:<10} {job.result or job.error or ''}")
    return 0


def cmd_jobs_show(args) -> int:
    from loraforge.jobs import JobQueue
    from loraforge.store import Store

    print(json.dumps(JobQueue(Store()).get(args.job_id).public(), indent=2))
    return 0


def cmd_jobs_cancel(args) -> int:
    from loraforge.jobs import JobQueue
    from loraforge.store import Store

    job = JobQueue(Store()).cancel(args.job_id)
    print(f"job {job.id}: {job.status}")
    return 0


def cmd_jobs_resume(args) -> int:
    from loraforge.jobs import JobQueue
    from loraforge.store import Store

    job = JobQueue(Store()).resume(args.job_id)
    print(f"job {job.id}: {job.status} (resumes from its last checkpoint when a worker picks it up)")
    return 0


def cmd_chat(args) -> int:
    from loraforge.engine import Engine
    from loraforge.engine.batch import BASE_ADAPTER
    from loraforge.store import Store

    engine = Engine(Store(), args.device)
    messages = [{"role": "user", "content": args.prompt}]
    models = [args.model]
    if args.compare_base:
        base, adapter, _shown = engine.resolve_model(args.model)
        if adapter == BASE_ADAPTER:
            raise LoraforgeError("--compare-base needs an adapter as MODEL", field="model")
        models = [base.requested, args.model]
    for model in models:
        result = engine.complete(model, messages, temperature=args.temperature, max_tokens=args.max_tokens,
                                 seed=args.seed, scope=args.scope)
        print(f"{model:>24}: {result.text}" if args.compare_base else result.text)
        routing = result.routing
        if routing and routing["answered_by"] != routing["adapter"]:
            print(f"(outside {routing['adapter']}'s scope: similarity {routing['similarity']:.2f} < {routing['threshold']:g}; "
                  f"answered by {routing['answered_by']})", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from loraforge.engine import Engine
    from loraforge.evals.runner import load_probes
    from loraforge.evals.service import evaluate, format_report, snapshot
    from loraforge.evals.suite import load_suite
    from loraforge.store import Store

    store = Store()
    engine = Engine(store, args.device)
    if args.suite == "snapshot":  # loraforge eval snapshot --model M [--probes FILE]
        if not args.model:
            return _err("eval snapshot needs --model")
        probe_file = Path(args.probes).resolve() if args.probes else None  # the user's own file, any folder
        probes = load_probes(probe_file.name, probe_file.parent) if probe_file else load_probes("builtin", None,
                                                                                               model=args.model)
        snap = snapshot(engine, store, args.model, probes, max_tokens=args.max_tokens, refresh=True)
        print(f"snapshot of {snap['model']} on {snap['total']} probes: {snap['correct']} answered correctly "
              f"({snap['correct'] / snap['total']:.1%}); retention counts these")
        return 0
    if args.probes:
        return _err("--probes belongs to `loraforge eval snapshot`; a suite names its probes under retention")
    if args.compare not in (None, "base"):
        return _err("--compare takes one value: base")
    report = evaluate(engine, store, load_suite(Path(args.suite)), model=args.model, adapter=args.adapter,
                      compare_base=args.compare == "base", samples=args.samples, k=args.k or args.samples,
                      temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, scope=args.scope)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_export(args) -> int:
    from loraforge.export import export_adapter
    from loraforge.store import Store

    result = export_adapter(Store(), args.ref, args.format, Path(args.dir), dtype=args.dtype)
    print(f"exported {result['adapter']} as {result['format']} to {result['dir']} ({_fmt_bytes(result['bytes'])})")
    for name, size in result["files"].items():
        print(f"  {name:<34} {size:>14,} bytes")
    if result.get("command"):
        print(f"next: {result['command']}")
    return 0


def cmd_demo(args) -> int:
    from loraforge.demo import run_demo, to_markdown

    console = _console()
    if args.model == "tiny":
        build_tiny_with_progress()
    summary = run_demo(Path(args.out), model=args.model, device=args.device, configs=tuple(args.configs or ()) or None,
                       log=lambda m: console.print(m, markup=False))
    console.print()
    console.print(to_markdown(summary), markup=False)
    console.print(f"written: {args.out}/demo.md, demo.png, demo.json", markup=False)
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from loraforge.serve.app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("LORAFORGE_API_KEY"):
        print(f"warning: serving on {args.host} without LORAFORGE_API_KEY: anyone who can reach this "
              "address can train and chat", file=sys.stderr)
    preload = []
    if args.model:
        if args.model == "tiny":
            build_tiny_with_progress()
        preload = [args.model]
    schedule = None
    if args.schedule:
        from loraforge.nightly import load_schedule

        schedule = load_schedule(Path(args.schedule))
        for entry in schedule:
            print(f"nightly: {entry.adapter} at {entry.at} from data/{entry.inbox}/", flush=True)
    app = create_app(device=args.device, max_jobs=args.max_jobs, preload=preload, schedule=schedule,
                     max_batch=args.max_batch, max_queued=args.max_queued,
                     allowed_hosts=[] if args.host in ("0.0.0.0", "::") else [args.host])
    print(f"loraforge {__version__} serving on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    if args.model:
        print(f"try: curl http://{args.host}:{args.port}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{args.model}\", \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"What is the capital of France?\"}}]}}'", flush=True)
    from loraforge.serve.app import DrainingServer

    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level),
                            drain_timeout=args.drain_timeout)
    server.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description="Train, store, serve and validate LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"loraforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_args(p):
        p.add_argument("config", help="training config (JSON or YAML; seed dialects accepted)")
        p.add_argument("--model", help="base model: tiny, a catalog alias, a Hugging Face id or a folder "
                                       "(replaces model_name)")
        p.add_argument("--data", help="training data file (JSON array or JSONL); replaces training_data")
        p.add_argument("--name", help="adapter name in the store (replaces output_dir)")
        p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")

    p = sub.add_parser("train", help="train a LoRA adapter into the store")
    config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the unfinished run from its last checkpoint")
    p.add_argument("--fresh", action="store_true", help="discard an unfinished run and start over")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (beats epochs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="start even when the memory estimate exceeds the machine's")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a config (and its data): resolved config, adapter size, "
                                        "peak memory and training time before training")
    config_args(p)
    p.add_argument("--json", action="store_true", help="everything as one JSON object")
    p.add_argument("--no-calibrate", action="store_true", help="do not measure the training speed when none is "
                   "cached (the time estimate is then left out)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="estimate memory for another machine's device")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="estimate memory at this precision")
    p.add_argument("--quantization", choices=["4bit"], help="estimate memory with a 4-bit base (QLoRA)")
    p.set_defaults(func=cmd_validate)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True,
                                                                          metavar="ACTION")
    p = models.add_parser("list", help="the catalog and what is cached")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("import", help="convert a GGUF file or an Ollama model (ollama:NAME[:TAG]) once")
    p.add_argument("source", help="a .gguf file, ollama:NAME[:TAG], or a packaged catalog model")
    p.set_defaults(func=cmd_models_import)
    p = models.add_parser("build", help="build the built-in tiny model now")
    p.add_argument("model", nargs="?", default="tiny")
    p.set_defaults(func=cmd_models_build)

    cli_adapters.add_adapters_parser(sub)

    jobs = sub.add_parser("jobs", help="training jobs").add_subparsers(dest="jobs_command", required=True,
                                                                       metavar="ACTION")
    p = jobs.add_parser("list", help="recent jobs and their state")
    p.set_defaults(func=cmd_jobs_list)
    for action, func, text in (("show", cmd_jobs_show, "one job"), ("cancel", cmd_jobs_cancel, "cancel a job"),
                               ("resume", cmd_jobs_resume, "resume an interrupted job from its checkpoint")):
        p = jobs.add_parser(action, help=text)
        p.add_argument("job_id")
        p.set_defaults(func=func)

    p = sub.add_parser("chat", help="one chat turn against the store directly (no server needed)")
    p.add_argument("model", help="base model, adapter NAME or NAME@vN")
    p.add_argument("prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--compare-base", action="store_true", help="answer with the adapter's base too, first")
    p.add_argument("--scope", choices=["all", "near"], help="override the adapter's scope: all (it answers "
                   "anything) or near (only questions near its training questions; the base answers the rest)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="score a base model or adapter on a knowledge suite; `eval snapshot` records "
                                    "the base's answers for retention",
                       description="loraforge eval SUITE --model M [--adapter A[@vN]] [--compare base]\n"
                                   "loraforge eval snapshot --model M [--probes FILE]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", help="suite file (YAML/JSON), or the word snapshot")
    p.add_argument("--model", help="base model (defaults to the adapter's own base)")
    p.add_argument("--adapter", help="adapter NAME or NAME@vN to evaluate")
    p.add_argument("--compare", help="base: evaluate the base too and show what changed")
    p.add_argument("--probes", help="with snapshot: probe file of {id, prompt, answer?} (default: built-in set)")
    p.add_argument("--samples", type=int, default=1, help="samples per case (needs --temperature > 0)")
    p.add_argument("--k", type=int, help="pass@k with samples (default k = samples)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--scope", choices=["all", "near"], help="override the adapter's scope (default: its own, as "
                   "it is served)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=cmd_eval)

    cli_adapters.add_update_parser(sub)

    from loraforge.demo import CONFIGS, REAL_MODEL_CONFIGS

    p = sub.add_parser("demo", help="the knowledge-override scenario end to end: evaluate, train v1/v2/v3 (or the recommended "
                                    "config on a real model), "
                                    "compare (table, Markdown, PNG)")
    p.add_argument("--out", default="demo-output", help="folder for demo.md, demo.png, demo.json")
    p.add_argument("--model", default="tiny", help="base model (default: the built-in tiny model; "
                   "smollm2-135m-instruct runs v1, v2 and the recommended config on the real model)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--configs", nargs="+", metavar="CONFIG",
                   choices=sorted({*CONFIGS, *REAL_MODEL_CONFIGS}),
                   help="only these of the shipped configs (default: all of them for the model)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="an adapter where you run models: peft, merged, gguf (llama.cpp), ollama, vllm")
    p.add_argument("ref", help="adapter NAME or NAME@vN")
    p.add_argument("dir", help="output folder (new, or empty)")
    p.add_argument("--format", required=True, choices=["peft", "merged", "gguf", "ollama", "vllm"])
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="merged: the weights' dtype (default: the base's); gguf: float16 halves the file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="start the local server (OpenAI API, training jobs, adapters)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need to be "
                                                       "given explicitly)")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--model", help="base model to load at start (e.g. tiny)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--max-jobs", type=int, help="training jobs at once per device (default 1)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per base model "
                                                             "(default 16; 1 turns batching off)")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting per base model before new ones "
                                                              "get 429 (default 64)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds a stopping server lets requests in "
                                                                      "flight finish (default 30)")
    p.add_argument("--schedule", help="YAML list of nightly updates: adapter, at (HH:MM), inbox folder in "
                                      "$LORAFORGE_HOME/data, update options")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    from loraforge import cli_tune

    cli_tune.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoraforgeError as exc:
        return _err(exc.message)
    except KeyboardInterrupt:
        return _err("interrupted")
