"""Evaluate a base model or an adapter version with a suite, on the engine; keep the result in the store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraforge import paths
from loraforge.errors import ConfigError
from loraforge.evals.runner import (Generate, SuiteRun, changes, load_probes, probes_digest, run_cases, score_run,
                                    snapshot_cases, take_snapshot)
from loraforge.evals.suite import Suite
from loraforge.models import resolve_base_model
from loraforge.names import parse_ref

DEFAULT_MAX_TOKENS = 96


def engine_generator(engine, model: str, *, temperature: float = 0.0, top_p: float = 1.0,
                     max_tokens: int = DEFAULT_MAX_TOKENS, seed: int | None = 0, scope: str | None = None) -> Generate:
    def generate(chats: list[list[dict]], n: int) -> list[list[str]]:
        return engine.generate_batch(model, chats, n=n, temperature=temperature, top_p=top_p,
                                     max_tokens=max_tokens, seed=seed, scope=scope)
    return generate


def _snapshot_path(store, fingerprint: str, digest: str, max_tokens: int) -> Path:
    key = hashlib.sha256(f"{fingerprint}:{digest}:{max_tokens}".encode()).hexdigest()[:20]
    return store.root / "snapshots" / f"{key}.json"


def snapshot(engine, store, model: str, probes: list[dict], *, max_tokens: int = DEFAULT_MAX_TOKENS,
             refresh: bool = False) -> dict:
    """The base's answers on `probes` (cached per base fingerprint, probe set and max_tokens)."""
    base = engine.load_base(model)
    path = _snapshot_path(store, f"{base.fingerprint}:{base.precision}", probes_digest(probes), max_tokens)
    if path.is_file() and not refresh:
        return json.loads(path.read_text(encoding="utf-8"))
    snap = take_snapshot(engine_generator(engine, model, max_tokens=max_tokens), probes, model=base.id,
                         fingerprint=base.fingerprint)
    paths.atomic_write_json(path, snap)
    return snap


def resolve_target(store, model: str | None, adapter: str | None) -> tuple[str, object | None]:
    """(base model name, adapter version or None); the two must agree when both are given."""
    if adapter is None:
        if not model:
            raise ConfigError("give a model, an adapter, or both", field="model")
        return model, None
    version = store.get(parse_ref(adapter, "adapter"))
    own = version.config.get("model_name") or version.base_model
    if model and resolve_base_model(model).id != resolve_base_model(own).id:
        raise ConfigError(f"adapter {version.ref} was trained on {own!r}, not {model!r}", field="model")
    return model or own, version


def evaluate(engine, store, suite: Suite, *, model: str | None = None, adapter: str | None = None,
             compare_base: bool = False, samples: int = 1, k: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int | None = 0,
             record: bool = True, scope: str | None = None) -> dict:
    """Score a suite on a base model or an adapter version. An adapter answers as it is served: with
    `scope: near` (its config's, or `scope` here) the base answers the cases outside its scope, and the
    report's `routing` counts who answered what."""
    if samples > 1 and temperature <= 0:
        raise ConfigError("samples > 1 needs temperature > 0 (greedy decoding gives one answer)", field="samples")
    base_name, version = resolve_target(store, model, adapter)
    cases = list(suite.cases)
    if suite.retention is not None:
        probes = load_probes(suite.retention.probes, Path(suite.source_dir) if suite.source_dir else None,
                             model=base_name)
        snap = snapshot(engine, store, base_name, probes, max_tokens=max_tokens)
        cases += snapshot_cases(snap, suite.retention.tags, suite.retention.exclude_tags)
    decoding = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}

    def run(target: str) -> SuiteRun:
        generate = engine_generator(engine, target, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                    seed=seed, scope=scope if target != base_name else None)
        return run_cases(generate, suite, cases, model=target, samples=samples, k=k)

    target = version.ref if version else base_name
    result = run(target)
    routes = [engine.route(target, case.chat(), scope) for case in cases] if version is not None else None
    base_run = run(base_name) if version is not None and compare_base else None
    if base_run is not None:
        score_run(result, base_run)
    report = {
        "suite": suite.name, "suite_digest": suite.digest(), "model": resolve_base_model(base_name).id,
        "adapter": version.ref if version else None, "samples": samples, "k": k, "decoding": decoding,
        "scores": result.scores, "counts": result.counts, "tags": result.tags,
        "cases": [c.__dict__ | {"passed": c.passed} | ({"answered_by": r["answered_by"]} if r else {})
                  for c, r in zip(result.cases, routes or [None] * len(result.cases))],
        "base": None, "changes": [], "routing": routing_summary(result, routes) if routes else None,
    }
    if base_run is not None:
        report["base"] = {"scores": base_run.scores, "counts": base_run.counts, "tags": base_run.tags,
                          "cases": [c.__dict__ | {"passed": c.passed} for c in base_run.cases]}
        report["changes"] = changes(base_run, result)
    if record:
        report["id"] = store.record_eval(report, name=version.name if version else None,
                                         version=version.version if version else None)
    return report


def routing_summary(result: SuiteRun, routes: list[dict]) -> dict:
    """Per kind of case: how many the adapter answered itself (the rest went to the base: outside its scope)."""
    first = routes[0]
    summary = {"scope": first["scope"], "threshold": first.get("threshold"), "adapter": {}, "cases": {}}
    for case, route in zip(result.cases, routes):
        summary["cases"][case.kind] = summary["cases"].get(case.kind, 0) + 1
        own = route["answered_by"] == route["adapter"]
        summary["adapter"][case.kind] = summary["adapter"].get(case.kind, 0) + own
    return summary


def format_report(report: dict) -> str:
    """A plain-text table: scores per kind and tag, base beside adapter, then the changed cases."""
    lines = []
    target = report["adapter"] or report["model"]
    base = report.get("base")
    lines.append(f"suite {report['suite']} on {target}" + (f" (base {report['model']})" if report["adapter"] else ""))
    head = f"{'score':<22}" + (f"{'base':>10}" if base else "") + f"{'this':>10}{'cases':>8}"
    lines.append(head)

    def cell(value) -> str:
        return f"{value * 100:9.1f}%" if value is not None else f"{'-':>10}"

    for key, value in report["scores"].items():
        row = f"{key:<22}" + (cell(base["scores"].get(key)) if base else "") + cell(value)
        lines.append(row + f"{report['counts'].get(key, 0):>8}")
    for tag, value in report["tags"].items():
        row = f"  tag {tag:<18}" + (cell(base["tags"].get(tag)) if base else "") + cell(value)
        lines.append(row)
    if base:
        changed = report["changes"]
        lines.append(f"{len(changed)} case(s) changed outcome")
        for change in changed[:30]:
            lines.append(f"  {change['id']} [{change['kind']}] {change['base']} -> {change['adapter']}: "
                         f"{change['adapter_output'][:90]!r}")
    routing = report.get("routing")
    if routing and routing["scope"] == "near":
        answered = ", ".join(f"{routing['adapter'][kind]} of {total} {kind}" for kind, total in routing["cases"].items())
        lines.append(f"scope near (threshold {routing['threshold']:g}): the adapter answered {answered} cases; "
                     "the base the rest")
    if report.get("id"):
        lines.append(f"recorded as eval {report['id']}")
    return "\n".join(lines)
