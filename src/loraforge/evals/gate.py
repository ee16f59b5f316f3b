"""The promotion gate: a pure decision from measured scores, with the reasons spelled out.

Promote a candidate when
- the new knowledge's suite reaches its thresholds (efficacy, and generalization when the suite has
  paraphrases), and
- every earlier suite in the lineage scores at least the parent's score minus a tolerance, on each
  guarded score: efficacy and retention by default. Generalization of earlier suites is reported but
  guarded only when asked (`guard` includes it): held-out paraphrase sets are small (a few cases), so
  that score moves a whole case at a time and would reject sound updates on noise.
Otherwise reject, listing every reason at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraforge.evals.suite import SCORE_NAMES

KIND_SCORES = tuple(SCORE_NAMES.values())


@dataclass(frozen=True)
class GatePolicy:
    min_efficacy: float = 0.9
    min_generalization: float = 0.0
    tolerance: float = 0.05
    guard: tuple[str, ...] = ("efficacy", "retention")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"decision": "promote" if self.promote else "reject", "reasons": self.reasons}


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def decide_promotion(candidate: dict[str, dict], parent: dict[str, dict], new_suite: str | None,
                     policy: GatePolicy = GatePolicy()) -> Decision:
    """`candidate` / `parent`: suite name -> {efficacy, generalization, retention} (None = no such cases).

    `parent` holds the parent version's scores on the earlier suites (and may lack the new one).
    """
    reasons: list[str] = []
    if new_suite is not None:
        scores = candidate.get(new_suite)
        if scores is None:
            reasons.append(f"new suite {new_suite}: not evaluated")
        else:
            efficacy = scores.get("efficacy")
            if efficacy is None:
                reasons.append(f"new suite {new_suite}: has no target cases, so nothing shows it was learned")
            elif efficacy < policy.min_efficacy:
                reasons.append(f"new suite {new_suite}: efficacy {_pct(efficacy)} < {_pct(policy.min_efficacy)}")
            general = scores.get("generalization")
            if general is not None and general < policy.min_generalization:
                reasons.append(f"new suite {new_suite}: generalization {_pct(general)} < "
                               f"{_pct(policy.min_generalization)}")
    for suite, before in sorted(parent.items()):
        if suite == new_suite:
            continue
        after = candidate.get(suite)
        if after is None:
            reasons.append(f"suite {suite}: not evaluated on the candidate")
            continue
        for key in KIND_SCORES:
            if key not in policy.guard:
                continue
            old, new = before.get(key), after.get(key)
            if old is None:
                continue
            if new is None or new < old - policy.tolerance - 1e-9:
                shown = "missing" if new is None else _pct(new)
                reasons.append(f"suite {suite}: {key} {_pct(old)} -> {shown} (parent's score minus tolerance "
                               f"{_pct(policy.tolerance)} is {_pct(max(0.0, old - policy.tolerance))})")
    return Decision(not reasons, reasons)
