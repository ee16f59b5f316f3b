"""The promotion gate as a table of cases."""

from __future__ import annotations

import pytest

from loraforge.evals.gate import GatePolicy, decide_promotion


def s(efficacy=None, generalization=None, retention=None):
    return {"efficacy": efficacy, "generalization": generalization, "retention": retention}


PARENT = {"day1": s(1.0, 1.0, 1.0), "for-two": s(1.0, 0.9, 0.98)}


@pytest.mark.parametrize("candidate, parent, new, policy, promote, reason_words", [
    # learned the new fact, kept everything: promote
    ({**PARENT, "day2": s(1.0, 1.0, 1.0)}, PARENT, "day2", GatePolicy(), True, []),
    # within tolerance (0.98 -> 0.95 with tolerance 0.05): promote
    ({"day1": s(1.0, 1.0, 1.0), "for-two": s(1.0, 0.9, 0.95), "day2": s(0.9, None, 1.0)}, PARENT, "day2",
     GatePolicy(), True, []),
    # the new fact not learned well enough
    ({**PARENT, "day2": s(0.5, 1.0, 1.0)}, PARENT, "day2", GatePolicy(), False, ["new suite day2: efficacy 50.0% < 90.0%"]),
    # generalization threshold applies when set and the suite has paraphrases
    ({**PARENT, "day2": s(1.0, 0.25, 1.0)}, PARENT, "day2", GatePolicy(min_generalization=0.5), False,
     ["generalization 25.0% < 50.0%"]),
    ({**PARENT, "day2": s(1.0, None, 1.0)}, PARENT, "day2", GatePolicy(min_generalization=0.5), True, []),
    # an earlier fact forgotten (the poisoned update)
    ({"day1": s(0.0, 0.0, 1.0), "for-two": PARENT["for-two"], "day2": s(1.0, 1.0, 1.0)}, PARENT, "day2",
     GatePolicy(), False, ["suite day1: efficacy 100.0% -> 0.0%"]),
    # earlier paraphrase scores are guarded only when asked
    ({"day1": s(1.0, 0.33, 1.0), "for-two": PARENT["for-two"], "day2": s(1.0, 1.0, 1.0)}, PARENT, "day2",
     GatePolicy(), True, []),
    ({"day1": s(1.0, 0.33, 1.0), "for-two": PARENT["for-two"], "day2": s(1.0, 1.0, 1.0)}, PARENT, "day2",
     GatePolicy(guard=("efficacy", "generalization", "retention")), False,
     ["suite day1: generalization 100.0% -> 33.0%"]),
    # retention dropped beyond tolerance
    ({"day1": PARENT["day1"], "for-two": s(1.0, 0.9, 0.90), "day2": s(1.0, 1.0, 1.0)}, PARENT, "day2",
     GatePolicy(), False, ["suite for-two: retention 98.0% -> 90.0%"]),
    # tolerance zero: any drop rejects
    ({"day1": PARENT["day1"], "for-two": s(1.0, 0.9, 0.97), "day2": s(1.0, 1.0, 1.0)}, PARENT, "day2",
     GatePolicy(tolerance=0.0), False, ["retention 98.0% -> 97.0%"]),
    # an earlier suite not evaluated is a reason, not a pass
    ({"for-two": PARENT["for-two"], "day2": s(1.0, 1.0, 1.0)}, PARENT, "day2", GatePolicy(), False,
     ["suite day1: not evaluated on the candidate"]),
    # a new suite without target cases cannot show learning
    ({**PARENT, "day2": s(None, None, 1.0)}, PARENT, "day2", GatePolicy(), False, ["has no target cases"]),
    ({**PARENT}, PARENT, "day2", GatePolicy(), False, ["new suite day2: not evaluated"]),
    # no new suite (a replay-only refresh): only the earlier suites decide
    ({**PARENT}, PARENT, None, GatePolicy(), True, []),
    # a score the parent did not have is not compared
    ({"day1": s(1.0, None, None)}, {"day1": s(1.0, None, None)}, None, GatePolicy(), True, []),
    # several reasons at once
    ({"day1": s(0.0, 1.0, 1.0), "for-two": s(0.0, 0.9, 0.98), "day2": s(0.0, 1.0, 1.0)}, PARENT, "day2",
     GatePolicy(), False, ["new suite day2: efficacy", "suite day1: efficacy", "suite for-two: efficacy"]),
])
def test_decide_promotion(candidate, parent, new, policy, promote, reason_words):
    decision = decide_promotion(candidate, parent, new, policy)
    assert decision.promote is promote, decision.reasons
    for words in reason_words:
        assert any(words in r for r in decision.reasons), (words, decision.reasons)
    if promote:
        assert decision.reasons == []
    assert decision.to_json()["decision"] == ("promote" if promote else "reject")
