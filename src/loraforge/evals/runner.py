"""Run a suite against a base model or an adapter; scores per kind and per tag; base-vs-adapter changes.

Generation goes through a `generate(chats, n) -> list[list[str]]` callable, so the same code scores
the server's engine, the CLI and a model in the middle of training. Greedy decoding by default
(n = 1); with sampling, each case gets `n` samples and the unbiased pass@k estimator
(Chen et al., 2021): 1 - C(n - c, k) / C(n, k) for c passing samples.

Retention is scored against the base: a retention case counts only if the base passes it (the base's
correct answers), so an adapter is never blamed for what the base never knew. Retention cases built
from a snapshot are base-correct by construction.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from math import comb
from pathlib import Path

from loraforge import paths
from loraforge.errors import ConfigError
from loraforge.evals.suite import KINDS, SCORE_NAMES, Case, Expect, Suite, normalise
from loraforge.structured import read_structured

Generate = Callable[[list[list[dict]], int], list[list[str]]]


@dataclass
class CaseResult:
    id: str
    kind: str
    tags: list[str]
    prompt: str
    outputs: list[str]
    passes: int
    score: float  # 1/0 for greedy, pass@k with samples

    @property
    def passed(self) -> bool:
        return self.score >= 0.5


@dataclass
class SuiteRun:
    suite: str
    suite_digest: str
    model: str
    samples: int
    k: int
    cases: list[CaseResult]
    scores: dict[str, float | None] = field(default_factory=dict)
    tags: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def by_id(self) -> dict[str, CaseResult]:
        return {c.id: c for c in self.cases}

    def to_json(self) -> dict:
        return asdict(self)


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


# ---- probes and snapshots ----------------------------------------------------------------------------------
GENERAL_PROBES = Path(__file__).resolve().parent / "data" / "general_probes.jsonl"


def load_probes(spec: str, base_dir: Path | None, model: str | None = None) -> list[dict]:
    """A file of {id, prompt, answer?, tags?} next to the suite, or `builtin`: for the built-in `tiny`,
    its own corpus probes; for any other model, the general-knowledge set (capitals, arithmetic, units,
    famous works and people, science and the world: `evals/data/general_probes.jsonl`), asked the way a
    user asks. Which probes count is decided by the base's own snapshot."""
    if spec == "builtin":
        from loraforge.models import resolve_base_model

        if model is None or resolve_base_model(model).kind == "tiny":
            from loraforge.models.tiny import corpus

            return [{"id": p["id"], "prompt": p["prompt"], "answer": p["answer"], "tags": [p["topic"]]}
                    for p in corpus.probes()]
        base_dir, spec = GENERAL_PROBES.parent, GENERAL_PROBES.name
    path = paths.inside(base_dir or Path.cwd(), spec, what="probes file", field="retention.probes",
                        error=ConfigError)
    raw = read_structured(path)
    if isinstance(raw, dict) and "probes" in raw:
        raw = raw["probes"]
    if not isinstance(raw, list):
        raise ConfigError(f"{path.name}: probes must be a list of {{id, prompt, answer?}}", field="probes")
    out, seen = [], set()
    for index, row in enumerate(raw):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ConfigError(f"{path.name}: probe {index + 1}: needs a non-empty prompt", field=f"probes[{index}]")
        probe_id = str(row.get("id", index + 1))
        if probe_id in seen:
            raise ConfigError(f"{path.name}: probe {index + 1}: duplicate id {probe_id!r}", field=f"probes[{index}]")
        seen.add(probe_id)
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ConfigError(f"{path.name}: probe {probe_id!r}: answer must be a string", field=f"probes[{index}]")
        out.append({"id": probe_id, "prompt": row["prompt"], "answer": answer, "tags": list(row.get("tags", []))})
    if not out:
        raise ConfigError(f"{path.name}: no probes", field="probes")
    return out


def probes_digest(probes: list[dict]) -> str:
    return hashlib.sha256(json.dumps(probes, sort_keys=True).encode()).hexdigest()[:16]


def probe_expect(answer: str) -> Expect:
    """A probe's answer as a matcher: contained in the output; a number must stand on its own ("12" is
    not found in "112")."""
    if answer.strip().isdigit():
        return Expect(regex=rf"(?<![0-9]){re.escape(answer.strip())}(?![0-9])")
    return Expect(contains=answer)


def take_snapshot(generate: Generate, probes: list[dict], *, model: str, fingerprint: str | None) -> dict:
    """The base's own answers on the probes, and which of them are correct (answer contained)."""
    outputs = generate([[{"role": "user", "content": p["prompt"]}] for p in probes], 1)
    rows = []
    for probe, out in zip(probes, outputs):
        answer = probe.get("answer")
        correct = answer is None or probe_expect(answer).check(out[0])
        rows.append({**probe, "base_output": out[0], "correct": correct})
    return {"model": model, "fingerprint": fingerprint, "probes_digest": probes_digest(probes), "probes": rows,
            "correct": sum(r["correct"] for r in rows), "total": len(rows)}


def snapshot_cases(snapshot: dict, tags: list[str], exclude_tags: list[str] = ()) -> list[Case]:
    """Retention cases for the probes the base answered correctly: keep the answer (or the base's own words)."""
    cases = []
    for row in snapshot["probes"]:
        if not row["correct"] or set(row.get("tags", [])) & set(exclude_tags):
            continue
        expect = probe_expect(row["answer"]) if row.get("answer") else Expect(exact=row["base_output"])
        cases.append(Case(id=f"probe:{row['id']}", kind="retention", prompt=row["prompt"], expect=expect,
                          tags=list(dict.fromkeys(tags + row.get("tags", [])))))
    return cases


# ---- running ---------------------------------------------------------------------------------------------
def run_cases(generate: Generate, suite: Suite, cases: list[Case], *, model: str, samples: int = 1,
              k: int = 1, batch_size: int = 32) -> SuiteRun:
    if samples < 1 or not 1 <= k <= samples:
        raise ConfigError("need samples >= 1 and 1 <= k <= samples", field="k")
    results: list[CaseResult] = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        outputs = generate([c.chat() for c in chunk], samples)
        for case, outs in zip(chunk, outputs):
            passes = sum(case.expect.check(o) for o in outs)
            score = pass_at_k(samples, passes, k) if samples > 1 else float(passes)
            results.append(CaseResult(case.id, case.kind, list(case.tags), case.chat()[-1]["content"], outs,
                                      passes, score))
    run = SuiteRun(suite.name, suite.digest(), model, samples, k, results)
    score_run(run)
    return run


def score_run(run: SuiteRun, base: SuiteRun | None = None) -> None:
    """Scores per kind (efficacy, generalization, retention) and per tag; retention relative to `base`."""
    base_ids = base.by_id() if base else {}

    def counted(c: CaseResult) -> bool:
        return c.kind != "retention" or not base_ids or (c.id in base_ids and base_ids[c.id].passed)

    run.scores, run.counts, run.tags = {}, {}, {}
    for kind in KINDS:
        rows = [c for c in run.cases if c.kind == kind and counted(c)]
        run.scores[SCORE_NAMES[kind]] = sum(c.score for c in rows) / len(rows) if rows else None
        run.counts[SCORE_NAMES[kind]] = len(rows)
    tags = sorted({t for c in run.cases for t in c.tags})
    for tag in tags:
        rows = [c for c in run.cases if tag in c.tags and counted(c)]
        if rows:
            run.tags[tag] = sum(c.score for c in rows) / len(rows)


def changes(base: SuiteRun, adapter: SuiteRun) -> list[dict]:
    """Cases whose pass/fail differs between base and adapter."""
    base_ids = base.by_id()
    out = []
    for case in adapter.cases:
        before = base_ids.get(case.id)
        if before is not None and before.passed != case.passed:
            out.append({"id": case.id, "kind": case.kind, "base": "pass" if before.passed else "fail",
                        "adapter": "pass" if case.passed else "fail",
                        "base_output": before.outputs[0], "adapter_output": case.outputs[0]})
    return out
