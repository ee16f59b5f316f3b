"""`loraforge demo`: the seed's knowledge-override scenario, end to end, measured.

Evaluate the base → train each shipped config → evaluate it against the base → one side-by-side
table (efficacy, generalization, retention, trainable parameters, adapter bytes, training time) and
each model's own answer to the scenario's question ("What does 42 mean?"), printed and written as
Markdown and a PNG chart. Every figure comes from this run. On the built-in `tiny` the configs are the
seed's v1 and v2 and the anchored v3; on a real model (`--model smollm2-135m-instruct`, a folder, a
GGUF) v1, v2 and the recommended config for new knowledge (`smollm2.json`: KL toward the base).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from loraforge import paths

EXAMPLE_DIR = Path(__file__).resolve().parent / "examples" / "knowledge_override"
CONFIGS = ("v1_surgical.json", "v2_override.json", "v3_anchored.json")
REAL_MODEL_CONFIGS = ("v1_surgical.json", "v2_override.json", "smollm2.json")
SCORES = ("efficacy", "generalization", "retention")


def configs_for(model: str) -> tuple[str, ...]:
    return CONFIGS if model == "tiny" else REAL_MODEL_CONFIGS


def _answer(report: dict) -> str:
    """The model's reply to the suite's first case (the scenario's question), one line."""
    case = report["cases"][0]
    return " ".join(case["outputs"][0].split())


def run_demo(out_dir: Path, *, example_dir: Path = EXAMPLE_DIR, configs: tuple[str, ...] | None = None,
             model: str = "tiny", device: str = "auto", log: Callable[[str], None] = print,
             on_progress=None) -> dict:
    from loraforge.config import load_config_file, parse_train_config
    from loraforge.data import is_file_list, load_examples_from_file, load_examples_from_files
    from loraforge.engine import Engine
    from loraforge.evals.service import evaluate
    from loraforge.evals.suite import load_suite
    from loraforge.pipeline import train_into_store
    from loraforge.store import Store
    from loraforge.train.plan import plan_training

    configs = configs or configs_for(model)
    started = time.perf_counter()
    store = Store()
    engine = Engine(store, device)
    suite = load_suite(example_dir / "suite.yaml")
    log(f"evaluating the base model {model} on suite {suite.name}")
    base_report = evaluate(engine, store, suite, model=model)
    question = base_report["cases"][0]["prompt"]
    log(f"the base's own answer to {question!r}: {_answer(base_report)}")
    rows = [{"config": "base", "adapter": model, **{k: base_report["scores"][k] for k in SCORES},
             "answer": _answer(base_report),
             "trainable_parameters": 0, "adapter_bytes": 0, "training_seconds": 0.0, "steps": 0}]
    reports = {"base": base_report}
    for name in configs:
        config_path = example_dir / name
        spec = parse_train_config(load_config_file(config_path), source=name, model_name=model)
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"device": device})})
        data = spec.training_data
        examples = (load_examples_from_files([example_dir / f for f in data]) if is_file_list(data)
                    else load_examples_from_file(example_dir / data))
        plan = plan_training(spec)
        log(f"training {name}: {len(examples)} examples, r={spec.lora.r}, "
            f"{', '.join(spec.lora.target_modules)}, lr {spec.training.learning_rate:g}")
        version, result = train_into_store(store, plan, examples, run_id=f"demo-{spec.name}",
                                           on_progress=on_progress, log=lambda m: None)
        size, training = result.manifest["size"], result.manifest["training"]
        # as served; a scoped adapter is also measured answering everything, to show what its scope keeps
        for scope in ("near", "all") if spec.training.scope == "near" else (None,):
            report = evaluate(engine, store, suite, adapter=version.ref, compare_base=True, scope=scope)
            label = name.removesuffix(".json") + (f" (scope {scope})" if scope else "")
            reports[version.ref + (" scope all" if scope == "all" else "")] = report
            rows.append({"config": label, "adapter": version.ref,
                         **{k: report["scores"][k] for k in SCORES}, "answer": _answer(report),
                         "trainable_parameters": size["trainable_parameters"], "adapter_bytes": size["bytes_on_disk"],
                         "training_seconds": training["seconds"], "steps": training["steps"]})
            log(f"  {label} {version.ref}: " + ", ".join(f"{k} {_pct(report['scores'][k])}" for k in SCORES)
                + f", {size['bytes_on_disk']:,} bytes, {training['seconds']:.1f} s; answers: {_answer(report)}")
        engine.unload_adapter(version.ref)
    summary = {"model": model, "suite": suite.name, "question": question, "rows": rows,
               "seconds": round(time.perf_counter() - started, 1), "counts": base_report["counts"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(out_dir / "demo.md", to_markdown(summary))
    paths.atomic_write_json(out_dir / "demo.json", {"summary": summary, "reports": reports})
    plot(summary, out_dir / "demo.png")
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def to_markdown(summary: dict) -> str:
    counts = summary["counts"]
    lines = [
        f"Knowledge override on `{summary['model']}`, suite `{summary['suite']}` "
        f"({counts['efficacy']} target, {counts['generalization']} held-out paraphrase, "
        f"{counts['retention']} retention cases); whole run {summary['seconds']:.0f} s.",
        "",
        "| config | efficacy | generalization | retention | trainable params | adapter bytes | training s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        lines.append(f"| {row['config']} | {_pct(row['efficacy'])} | {_pct(row['generalization'])} | "
                     f"{_pct(row['retention'])} | {row['trainable_parameters']:,} | {row['adapter_bytes']:,} | "
                     f"{row['training_seconds']:.1f} |")
    lines += ["", f"Each model's answer to {summary['question']!r} (greedy):", ""]
    lines += [f"- {row['config']}: {_shorten(row['answer'])}" for row in summary["rows"]]
    return "\n".join(lines) + "\n"


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(8, 4.4))
    width = 0.8 / len(SCORES)
    for i, key in enumerate(SCORES):
        values = [100 * (r[key] or 0) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=key)
    ax.set_xticks([x + width for x in range(len(rows))],
                  [f"{r['config']}\n{r['adapter_bytes'] / 1000:.0f} KB" if r["adapter_bytes"] else r["config"]
                   for r in rows])
    ax.set_ylabel("% of cases")
    ax.set_ylim(0, 105)
    ax.set_title(f"Knowledge override on {summary['model']}: measured by suite {summary['suite']}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(SCORES), frameon=False)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
