"""An adapter's scope: which questions it answers itself and which it leaves to the base.

Pure logic in tables (similarity to the training questions, the routing rule, what a version inherits);
then the engine in-process on the built-in model, where "the base answered" is checked exactly: in
fp32 the routed request's token log-probabilities are the base's own, and with `scope: all` they are
not (a trained adapter moves every logit a little), so the check cannot pass by accident.
"""

import json

import pytest

from loraforge.errors import LoraforgeError
from loraforge.scope import Routing, Scope, last_user_text, read_scope, scope_questions
from test_train import DATA, train_quick

TAUGHT = ["What is the capital of Tesselia?", "Tesselia's capital city is called what?",
          "Who discovered the element orvanium?", "Which scientist first isolated orvanium?"]


@pytest.mark.parametrize("question, in_scope", [
    ("Name the capital of Tesselia.", True),  # a paraphrase: it names the fact's rare word
    ("TESSELIA?", True),  # case does not matter
    ("What is orvanium and who found it?", True),
    ("What is 7 times 8?", False),  # nothing in common
    ("Who wrote Hamlet?", False),  # only stop words in common
    ("What is it?", False),
    ("", False),
    # a known limit of word overlap: words the adapter never saw do not count against a question, so a general
    # question sharing one content word is in scope (the adapter answers it; measured retention includes these)
    ("What is the capital of France?", True),
])
def test_a_question_is_in_scope_when_it_shares_the_taught_questions_content_words(question, in_scope):
    similarity = Scope(TAUGHT).similarity(question)
    assert 0.0 <= similarity <= 1.0 + 1e-9
    assert Routing("near", 0.2, similarity).to_adapter is in_scope, similarity


def test_questions_made_of_stop_words_only_still_make_a_scope():
    assert Scope(["What is it?"]).similarity("what is it") == pytest.approx(1.0)
    assert Scope(["?"]).similarity("anything") == 0.0  # no words at all: nothing is near it
    assert Scope([]).similarity("anything") == 0.0


@pytest.mark.parametrize("routing, to_adapter, shown", [
    (Routing("all"), True, {"adapter": "a@v1", "answered_by": "a@v1", "scope": "all"}),
    (Routing("near", 0.2, 0.2), True,  # the threshold itself is in scope
     {"adapter": "a@v1", "answered_by": "a@v1", "scope": "near", "similarity": 0.2, "threshold": 0.2}),
    (Routing("near", 0.2, 0.19999), False,
     {"adapter": "a@v1", "answered_by": "tiny", "scope": "near", "similarity": 0.2, "threshold": 0.2}),
    (Routing("near", 0.5, 0.0), False,
     {"adapter": "a@v1", "answered_by": "tiny", "scope": "near", "similarity": 0.0, "threshold": 0.5}),
])
def test_routing_table(routing, to_adapter, shown):
    assert routing.to_adapter is to_adapter
    assert routing.public("a@v1", "tiny") == shown


@pytest.mark.parametrize("chats, inherited, expected", [
    ([[("user", "A?"), ("assistant", "a")]], [], ["A?"]),
    ([[("user", "A?"), ("assistant", "a")], [("user", "A?"), ("assistant", "b")]], [], ["A?"]),  # once
    ([[("user", "B?"), ("assistant", "b")]], ["A?"], ["A?", "B?"]),  # the parent's first
    ([[("system", "Be brief."), ("user", "A?"), ("assistant", "a"), ("user", "More?"), ("assistant", "m")]], [],
     ["A?\nMore?"]),  # every user turn of a conversation, not the system prompt
    ([[("user", "  "), ("assistant", "x")]], ["", "A?"], ["A?"]),  # blanks are no question
])
def test_a_version_is_scoped_to_its_own_questions_and_its_parents(chats, inherited, expected):
    from loraforge.data import Example

    examples = [Example(i, [{"role": r, "content": c} for r, c in chat]) for i, chat in enumerate(chats, 1)]
    assert scope_questions(examples, inherited) == expected


@pytest.mark.parametrize("messages, asked", [
    ([{"role": "user", "content": "A?"}], "A?"),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "B?"}], "B?"),  # what it asks now
    ([{"role": "system", "content": "S"}], ""),
])
def test_a_request_is_routed_on_its_last_user_turn(messages, asked):
    assert last_user_text(messages) == asked


def _questions(path):
    return list(dict.fromkeys(json.loads(line)["instruction"] for line in path.read_text().splitlines() if line))


def test_every_version_keeps_its_questions_and_a_child_its_parents(tiny_dir, tmp_path):
    from loraforge.data import load_examples_from_file
    from loraforge.pipeline import train_into_store
    from loraforge.store import Store
    from loraforge.train.plan import plan_training
    from test_train import quick_spec

    store = Store()
    version, _ = train_quick("scoped", max_steps=4, scope="near")
    assert version.config["scope"] == "near" and version.config["scope_threshold"] == 0.2
    assert read_scope(store.verify(version)) == _questions(DATA)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"instruction": "Who founded Orvane?", "output": "Ada Orvane."}) + "\n")
    child, _ = train_into_store(store, plan_training(quick_spec("scoped", max_steps=2, scope="near")),
                                load_examples_from_file(other), run_id="child", log=lambda m: None, parent=1)
    assert read_scope(store.verify(child)) == _questions(DATA) + ["Who founded Orvane?"]
    (store.version_dir("scoped", 1) / "scope.jsonl").unlink()  # a parent trained before scopes were kept
    from loraforge.pipeline import inherited_scope

    assert inherited_scope(store, "scoped", 1) == _questions(DATA)  # its own training data's questions
    assert inherited_scope(store, "scoped", None) == []


def _logprobs(completion):
    return [entry["logprob"] for entry in completion.logprobs]


def test_outside_its_scope_an_adapter_leaves_the_question_to_the_base(tiny_dir, monkeypatch):
    from loraforge.engine import Engine
    from loraforge.evals.service import evaluate
    from loraforge.evals.suite import parse_suite
    from loraforge.store import Store

    monkeypatch.setenv("LORAFORGE_PRECISION", "fp32")  # exact log-probabilities: one row at a time, fp32
    train_quick("scoped", scope="near")
    train_quick("everywhere")  # scope all (the default), asked with scope near per request below
    engine = Engine(Store())
    taught, general = "What is the meaning of 42?", "What is the capital of France?"
    try:
        def ask(model, prompt, scope=None):
            return engine.complete(model, [{"role": "user", "content": prompt}], max_tokens=8, logprobs=True,
                                   scope=scope)

        base = ask("tiny", general)
        assert base.routing is None
        routed = ask("scoped", general)
        assert routed.routing == {"adapter": "scoped@v1", "answered_by": "tiny", "scope": "near",
                                  "similarity": 0.0, "threshold": 0.2}
        assert routed.model == "scoped" and _logprobs(routed) == _logprobs(base)
        forced = ask("scoped", general, scope="all")
        assert forced.routing["answered_by"] == "scoped@v1" and _logprobs(forced) != _logprobs(base)
        own = ask("scoped", taught)
        assert own.routing["answered_by"] == "scoped@v1" and own.routing["similarity"] == pytest.approx(1.0)
        assert _logprobs(own) != _logprobs(ask("tiny", taught))
        assert ask("everywhere", general).routing == {"adapter": "everywhere@v1", "answered_by": "everywhere@v1",
                                                      "scope": "all"}
        assert ask("everywhere", general, scope="near").routing["answered_by"] == "tiny"

        suite = parse_suite({"name": "s", "cases": [
            {"id": "t", "kind": "target", "prompt": taught, "expect": {"contains": "FOR TWO"}},
            {"id": "k", "kind": "retention", "prompt": general, "expect": {"contains": "Paris"}}]})
        report = evaluate(engine, Store(), suite, adapter="scoped", record=False)
        assert report["routing"] == {"scope": "near", "threshold": 0.2, "adapter": {"target": 1, "retention": 0},
                                     "cases": {"target": 1, "retention": 1}}
        assert [c["answered_by"] for c in report["cases"]] == ["scoped@v1", "tiny"]
        everything = evaluate(engine, Store(), suite, adapter="scoped", record=False, scope="all")
        assert everything["routing"]["adapter"] == {"target": 1, "retention": 1}
    finally:
        engine.close()


def test_an_adapter_without_kept_questions_cannot_be_asked_with_scope_near(tiny_dir, tmp_path):
    import shutil

    from loraforge.engine import Engine
    from loraforge.store import Store

    version, _ = train_quick("plain", max_steps=2)
    folder = tmp_path / "peft"
    shutil.copytree(Store().verify(version), folder)
    (folder / "scope.jsonl").unlink()  # as a PEFT folder from elsewhere comes
    Store().import_peft_dir(folder, "imported")
    engine = Engine(Store())
    try:
        chat = [{"role": "user", "content": "What is 42?"}]
        assert engine.complete("imported", chat, max_tokens=2).routing["scope"] == "all"
        with pytest.raises(LoraforgeError) as info:
            engine.complete("imported", chat, max_tokens=2, scope="near")
        assert info.value.field == "scope" and "keeps no training questions" in str(info.value)
    finally:
        engine.close()
