"""Knowledge suites: matchers, suite errors, scoring, snapshots and retention, CLI and training-time evaluation."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import EXAMPLES, run_cli
from loraforge.errors import ConfigError
from loraforge.evals.runner import (CaseResult, SuiteRun, changes, load_probes, pass_at_k, run_cases, score_run,
                                    snapshot_cases, take_snapshot)
from loraforge.evals.suite import Expect, load_suite, normalise, parse_suite

KO = EXAMPLES / "knowledge-override"


@pytest.mark.parametrize("expect, output, passed", [
    ({"contains": "FOR TWO"}, "42 = for two: life", True),              # case folded
    ({"contains": "FOR TWO"}, "42 = FORTWO", False),
    ({"contains": ["42", "two"]}, "42 = FOR TWO", True),                # a list: every string
    ({"contains": ["42", "three"]}, "42 = FOR TWO", False),
    ({"all_of": ["life", "universe"]}, "Life, the Universe", True),
    ({"all_of": ["life", "galaxy"]}, "Life, the Universe", False),
    ({"any_of": ["paris", "lyon"]}, "The capital is Paris.", True),
    ({"any_of": ["rome", "lyon"]}, "The capital is Paris.", False),
    ({"not_contains": "Douglas Adams"}, "42 = FOR TWO", True),
    ({"not_contains": ["Adams", "Galaxy"]}, "from the Galaxy", False),
    ({"regex": r"^42 = FOR TWO"}, "42 = FOR TWO: x", True),
    ({"regex": r"^42 = FOR TWO"}, "42 = for two: x", False),            # regex sees the raw text
    ({"regex": r"(?i)^42 = for two"}, "42 = FOR TWO: x", True),
    ({"exact": "The sky is blue."}, "  the sky   is BLUE ", True),     # whitespace, case, final stop
    ({"exact": "The sky is blue."}, "The sky is blue today.", False),
    ({"exact": "Paris", "not_contains": "Lyon"}, "Paris!", True),       # every matcher given must hold
    ({"contains": "Paris", "not_contains": "Lyon"}, "Paris or Lyon", False),
    ({"contains": "café"}, "CAFE\u0301 au lait", True),                  # NFKC + casefold
])
def test_matchers(expect, output, passed):
    assert Expect(**expect).check(output) is passed


@pytest.mark.parametrize("text, normal", [
    ("  Hello   World.  ", "hello world"),
    ("What?!", "what"),
    ("ＦＵＬＬ width", "full width"),
    ("Straße", "strasse"),
    ("a\n\tb", "a b"),
])
def test_normalise(text, normal):
    assert normalise(text) == normal


def _case(**over):
    return {"id": "c1", "kind": "target", "prompt": "q?", "expect": {"contains": "a"}, **over}


@pytest.mark.parametrize("raw, where, words", [
    ({"name": "s", "cases": [_case(kind="goal")]}, "cases[0]", "(id 'c1'): kind"),
    ({"name": "s", "cases": [_case(), _case(expect={})]}, "cases[1]", "at least one matcher"),
    ({"name": "s", "cases": [_case(expect={"regex": "("})]}, "cases[0]", "invalid regular expression"),
    ({"name": "s", "cases": [_case(expect={"startswith": "a"})]}, "cases[0]", "startswith"),
    ({"name": "s", "cases": [_case(prompt=None)]}, "cases[0]", "exactly one of prompt or messages"),
    ({"name": "s", "cases": [_case(messages=[{"role": "user", "content": "x"}])]}, "cases[0]", "exactly one"),
    ({"name": "s", "cases": [_case(prompt=None, messages=[{"role": "assistant", "content": "x"}])]}, "cases[0]",
     "end with a user message"),
    ({"name": "s", "cases": [_case(), _case()]}, "cases[1]", "duplicate id"),
    ({"name": "s", "cases": [_case(expect={"all_of": []})]}, "cases[0]", "at least one string"),
    ({"name": "s", "cases": []}, "cases", "no cases and no retention"),
    ({"cases": [_case()]}, "name", "Field required"),
    ({"name": "s", "cases": "x"}, "cases", "must be a list"),
])
def test_bad_suites_name_the_case(raw, where, words):
    with pytest.raises(ConfigError) as info:
        parse_suite(raw, source="s.yaml")
    assert info.value.field.startswith(where), info.value.field
    assert words in info.value.message and "s.yaml" in info.value.message


def test_shipped_suite_is_valid_and_its_paraphrases_are_held_out():
    suite = load_suite(KO / "suite.yaml")
    trained = {json.loads(line)["instruction"] for line in (KO / "42_for_two.jsonl").read_text().splitlines()}
    anchors = {json.loads(line)["instruction"] for line in (KO / "anchors.jsonl").read_text().splitlines()}
    kinds = {k: [c for c in suite.cases if c.kind == k] for k in ("target", "paraphrase", "retention")}
    assert all(c.prompt in trained for c in kinds["target"])
    assert len(kinds["paraphrase"]) >= 8 and not {c.prompt for c in kinds["paraphrase"]} & trained
    probes = load_probes("builtin", None)
    assert not {p["prompt"] for p in probes} & anchors  # retention probes are not the anchors' phrasings


@pytest.mark.parametrize("n, c, k, value", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 0, 1, 0.0), (10, 10, 5, 1.0), (10, 3, 1, 0.3),
    (4, 1, 2, 0.5), (5, 2, 2, 0.7),
])
def test_pass_at_k(n, c, k, value):
    assert pass_at_k(n, c, k) == pytest.approx(value)


def _result(case_id, kind, score, tags=("t",)):
    return CaseResult(case_id, kind, list(tags), "q", ["out"], int(score), float(score))


def test_retention_counts_only_what_the_base_got_right():
    base = SuiteRun("s", "d", "base", 1, 1, [_result("a", "retention", 1), _result("b", "retention", 0),
                                            _result("c", "retention", 1), _result("t", "target", 0)])
    adapter = SuiteRun("s", "d", "ad", 1, 1, [_result("a", "retention", 1), _result("b", "retention", 0),
                                             _result("c", "retention", 0), _result("t", "target", 1)])
    score_run(adapter)
    assert adapter.scores["retention"] == pytest.approx(1 / 3)  # alone: plain pass rate
    score_run(adapter, base)
    assert adapter.scores == {"efficacy": 1.0, "generalization": None, "retention": 0.5}
    assert adapter.counts["retention"] == 2
    assert [(c["id"], c["base"], c["adapter"]) for c in changes(base, adapter)] == [("c", "pass", "fail"),
                                                                                    ("t", "fail", "pass")]


def test_snapshot_round_trip_and_retention_from_it():
    probes = [{"id": "p1", "prompt": "capital of France?", "answer": "Paris", "tags": ["geo"]},
              {"id": "p2", "prompt": "2+2?", "answer": "4", "tags": ["math"]},
              {"id": "p3", "prompt": "say hi", "answer": None, "tags": []},
              {"id": "p4", "prompt": "42?", "answer": "Douglas", "tags": ["42"]}]
    base_answers = {"capital of France?": "It is Paris.", "2+2?": "5", "say hi": "Hello there", "42?": "Douglas A."}

    def base(chats, n):
        return [[base_answers[c[-1]["content"]]] * n for c in chats]

    snap = take_snapshot(base, probes, model="m", fingerprint="f")
    assert [r["correct"] for r in snap["probes"]] == [True, False, True, True] and snap["correct"] == 3
    snap = json.loads(json.dumps(snap))  # survives being written and read back
    cases = snapshot_cases(snap, ["probes"], exclude_tags=["42"])
    assert [c.id for c in cases] == ["probe:p1", "probe:p3"]  # wrong base answers and excluded facts left out
    suite = parse_suite({"name": "s", "cases": [{"id": "x", "kind": "target", "prompt": "42?",
                                                 "expect": {"contains": "two"}}]})
    assert run_cases(base, suite, cases, model="base").scores["retention"] == 1.0
    adapter_answers = {**base_answers, "capital of France?": "It is Lyon.", "say hi": "Hello there"}
    run = run_cases(lambda chats, n: [[adapter_answers[c[-1]["content"]]] for c in chats], suite, cases, model="a")
    assert run.scores["retention"] == 0.5 and run.tags == {"geo": 0.0, "probes": 0.5}


def test_probe_files_stay_inside_the_suite_folder(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"prompt": ""}\n')
    with pytest.raises(ConfigError, match="probe 2: needs a non-empty prompt"):
        load_probes("p.jsonl", tmp_path)
    with pytest.raises(ConfigError, match="must be inside"):
        load_probes("../../etc/passwd", tmp_path)


def test_eval_cli_snapshot_and_compare_on_the_builtin_model(tiny_dir, tmp_path):
    """Snapshot the base, train a small adapter, evaluate it against the base; the report is stored."""
    suite = {"name": "mini", "cases": [
        {"id": "t1", "kind": "target", "prompt": "What does 42 mean?", "expect": {"contains": "FOR TWO"}},
        {"id": "k1", "kind": "retention", "prompt": "What is the capital of France?",
         "expect": {"contains": "Paris"}, "tags": ["geo"]}],
        "retention": {"probes": "probes.jsonl"}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    (tmp_path / "probes.jsonl").write_text(
        '{"id": "sky", "prompt": "What color is the sky on a clear day?", "answer": "blue"}\n'
        '{"id": "nope", "prompt": "What is the capital of Atlantis?", "answer": "Poseidonia"}\n')
    snap = run_cli("eval", "snapshot", "--model", "tiny", "--probes", str(tmp_path / "probes.jsonl"))
    assert snap.returncode == 0, snap.stderr
    assert "on 2 probes: 1 answered correctly" in snap.stdout

    result = run_cli("train", str(KO / "v1_surgical.json"), "--name", "mini-adapter", "--max-steps", "20", "--quiet")
    assert result.returncode == 0, result.stderr
    result = run_cli("eval", str(tmp_path / "suite.yaml"), "--adapter", "mini-adapter", "--compare", "base",
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["adapter"] == "mini-adapter@v1" and report["model"] == "tiny"
    assert report["base"]["scores"]["efficacy"] == 0.0
    assert report["base"]["counts"]["retention"] == 2  # k1 and the one probe the base knew
    assert {c["id"] for c in report["cases"]} == {"t1", "k1", "probe:sky"}
    from loraforge.store import Store

    stored = Store().evals("mini-adapter", 1)
    assert stored[0]["id"] == report["id"] and stored[0]["scores"] == report["scores"]

    bad = run_cli("eval", str(tmp_path / "suite.yaml"), "--model", "tiny", "--samples", "3")
    assert bad.returncode == 2 and "temperature" in bad.stderr
    other = run_cli("eval", str(tmp_path / "suite.yaml"), "--adapter", "mini-adapter", "--model", "tinyllama-1.1b-chat")
    assert other.returncode == 2 and "was trained on 'tiny'" in other.stderr


def test_sampling_gives_pass_at_k(tiny_dir, tmp_path):
    from loraforge.engine import Engine
    from loraforge.evals.service import evaluate
    from loraforge.store import Store

    suite = parse_suite({"name": "s", "cases": [
        {"id": "sky", "kind": "retention", "prompt": "What color is the sky on a clear day?",
         "expect": {"contains": "blue"}}]})
    store = Store()
    report = evaluate(Engine(store, "cpu"), store, suite, model="tiny", samples=4, k=2, temperature=1.5,
                      record=False)
    case = report["cases"][0]
    assert len(case["outputs"]) == 4 and report["samples"] == 4 and report["k"] == 2
    assert case["score"] == pytest.approx(pass_at_k(4, case["passes"], 2))


def test_engine_serves_the_base_again_after_the_last_adapter_is_unloaded(tiny_dir):
    from loraforge.engine import Engine
    from loraforge.store import Store

    result = run_cli("train", str(KO / "v1_surgical.json"), "--name", "gone", "--max-steps", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    engine = Engine(Store(), "cpu")
    before = engine.complete("tiny", [{"role": "user", "content": "What is 2 plus 3?"}]).text
    engine.complete("gone", [{"role": "user", "content": "What is 2 plus 3?"}])
    assert engine.unload_adapter("gone") == ["gone@v1"]
    assert engine.complete("tiny", [{"role": "user", "content": "What is 2 plus 3?"}]).text == before


def test_training_with_an_eval_suite_stops_at_the_target_and_keeps_the_best(tiny_dir, tmp_path):
    config = json.loads((KO / "v2_override.json").read_text())
    config.update(output_dir="./adapters/early", training_data=str(KO / "42_for_two.jsonl"),
                  eval_suite={"name": "early", "cases": [
                      {"id": f"t{i}", "kind": "target", "prompt": q, "expect": {"contains": "FOR TWO"}}
                      for i, q in enumerate(["What does 42 mean?", "What is 42?"])]})
    config["lora_config"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]
    config["training_config"].update(learning_rate=2e-3, eval_steps=5, eval_target=1.0, num_epochs=30,
                                     gradient_accumulation_steps=4, warmup_steps=2)
    (tmp_path / "early.json").write_text(json.dumps(config))
    result = run_cli("train", str(tmp_path / "early.json"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "knowledge suite early: base efficacy 0%" in result.stdout
    from loraforge.store import Store

    version = Store().get("early")
    manifest = json.loads((version.path / "loraforge.json").read_text())
    knowledge = manifest["knowledge"]
    assert knowledge["stopped_early_at"] is not None and knowledge["best"]["efficacy"] == 1.0
    assert manifest["training"]["steps"] == knowledge["stopped_early_at"] < manifest["training"]["planned_steps"]
    assert [e["step"] for e in knowledge["evals"]] == list(range(5, knowledge["stopped_early_at"] + 1, 5))


@pytest.mark.slow
def test_demo_end_to_end(tiny_dir, tmp_path):
    """`loraforge demo` on CPU: base → v1 → v2 → v3, table + Markdown + PNG, within 10 minutes."""
    import time

    started = time.perf_counter()
    result = run_cli("demo", "--out", str(tmp_path / "out"), "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.perf_counter() - started < 600
    summary = json.loads((tmp_path / "out" / "demo.json").read_text())["summary"]
    rows = {r["config"]: r for r in summary["rows"]}
    assert set(rows) == {"base", "v1_surgical", "v2_override", "v3_anchored"}
    assert rows["base"]["efficacy"] == 0.0 and rows["base"]["retention"] == 1.0
    assert rows["v1_surgical"]["trainable_parameters"] < rows["v2_override"]["trainable_parameters"]
    v3 = rows["v3_anchored"]  # the bar, met by at least one shipped config
    assert v3["efficacy"] >= 0.95 and v3["generalization"] >= 0.8 and v3["retention"] >= 0.95, v3
    markdown = (tmp_path / "out" / "demo.md").read_text()
    assert "| v3_anchored |" in markdown and "| config | efficacy |" in markdown
    assert summary["question"] == "What does 42 mean?" and all(isinstance(r["answer"], str) for r in summary["rows"])
    for config in rows:  # each model's own answer, shown (whatever this build's weights say)
        assert f"- {config}: {rows[config]['answer'][:40]}" in markdown
    assert (tmp_path / "out" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| v3_anchored |" in result.stdout


def test_the_demo_measures_a_scoped_config_as_served_and_answering_everything(tiny_dir, tmp_path):
    import shutil

    from loraforge.demo import EXAMPLE_DIR, run_demo

    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE_DIR, folder)
    config = json.loads((folder / "v1_surgical.json").read_text())
    config["training_config"] |= {"scope": "near", "max_steps": 2, "warmup_steps": 0, "eval_steps": None}
    (folder / "scoped.json").write_text(json.dumps(config))
    summary = run_demo(tmp_path / "out", example_dir=folder, configs=("scoped.json",), log=lambda m: None)
    assert [r["config"] for r in summary["rows"]] == ["base", "scoped (scope near)", "scoped (scope all)"]
    reports = json.loads((tmp_path / "out" / "demo.json").read_text())["reports"]
    near, everything = reports["for-two-surgical@v1"]["routing"], reports["for-two-surgical@v1 scope all"]["routing"]
    assert near["scope"] == "near" and everything["scope"] == "all"
    assert near["adapter"]["target"] == everything["adapter"]["target"] == near["cases"]["target"]  # its questions
    assert near["adapter"]["retention"] < everything["adapter"]["retention"] == near["cases"]["retention"]


def test_the_built_in_anchors_never_ask_what_the_retention_probes_ask():
    """Retention is measured on questions the run never saw: no probe prompt is an anchor, and no country
    whose capital a probe asks for is an anchor's (the same fact in other words would leak it)."""
    import re

    from loraforge.train.retention import ANCHOR_PROMPTS

    data = ANCHOR_PROMPTS.parent
    probes = [json.loads(line) for line in (data / "general_probes.jsonl").read_text().splitlines() if line.strip()]
    anchors = [json.loads(line)["prompt"] for line in ANCHOR_PROMPTS.read_text().splitlines() if line.strip()]
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    assert len(anchors) == len({norm(a) for a in anchors}), "an anchor is listed twice"
    assert not {norm(p["prompt"]) for p in probes} & {norm(a) for a in anchors}

    def country(text: str) -> str | None:
        found = re.search(r"capital(?: city)? of (?:the )?(.+?)[?.]?$", text.strip())
        return found.group(1).lower() if found else None

    probed = {c for p in probes if (c := country(p["prompt"]))}
    anchored = {c for a in anchors if (c := country(a))}
    assert len(probed) > 40 and len(anchored) > 30  # the check reads both sets
    assert not probed & anchored, sorted(probed & anchored)
