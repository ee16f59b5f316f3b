"""Data loading: every accepted form, a table of bad files, and loss masking on the answer only."""

import json

import pytest

from loraforge.data import (Example, data_hash, load_examples, load_examples_from_file, tokenize_example)
from loraforge.errors import DataError
from loraforge.models.tiny.build import build_tokenizer

USER_ANSWER = [{"role": "user", "content": "What is 42?"}, {"role": "assistant", "content": "FOR TWO."}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("record, messages", [
    ({"instruction": "What is 42?", "output": "FOR TWO."}, USER_ANSWER),
    ({"instruction": "What is 42?", "input": "", "output": "FOR TWO."}, USER_ANSWER),
    ({"instruction": "Explain", "input": "42", "output": "FOR TWO."},
     [{"role": "user", "content": "Explain\n\n42"}, {"role": "assistant", "content": "FOR TWO."}]),
    ({"prompt": "What is 42?", "completion": "FOR TWO."}, USER_ANSWER),
    ({"messages": USER_ANSWER}, USER_ANSWER),
    ({"system": "Be brief.", "prompt": "What is 42?", "completion": "FOR TWO.", "id": 7, "_note": "x"},
     [{"role": "system", "content": "Be brief."}, *USER_ANSWER]),
])
def test_accepted_forms(record, messages):
    assert load_examples([record], "d.json")[0].messages == messages


def write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


BAD_FILES = [
    ("empty.json", b"", "empty.json: file is empty"),
    ("blank.jsonl", b"\n  \n", "blank.jsonl: file is empty"),
    ("latin1.json", '[{"prompt": "caf\xe9", "completion": "x"}]'.encode("latin-1"), "latin1.json: not UTF-8 (byte 0xe9"),
    ("none.json", b"[]", "none.json: no records"),
    ("broken.json", b'[{"prompt": "a", "completion": "b"},', "broken.json: invalid JSON at line 1"),
    ("lines.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n', "lines.jsonl, line 2: invalid JSON"),
    ("missing.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
     "missing.jsonl, record 2: missing key 'completion'"),
    ("nokeys.json", b'[{"question": "a", "answer": "b"}]', "nokeys.json, record 1: missing keys"),
    ("typo.json", b'[{"instruction": "a", "ouput": "b"}]', "typo.json, record 1: unknown key 'ouput' (did you mean 'output'?)"),
    ("extra.json", b'[{"instruction": "a", "output": "b", "ouptut": "c"}]',
     "extra.json, record 1: unknown key 'ouptut' (did you mean 'output'?)"),
    ("emptyval.json", b'[{"instruction": "a", "output": "  "}]', "emptyval.json, record 1: 'output' is empty"),
    ("mixed.json", b'[{"instruction": "a", "output": "b", "prompt": "c", "completion": "d"}]', "mixes the"),
    ("notobj.json", b'["just text"]', "notobj.json, record 1: expected a JSON object"),
    ("number.json", b'[{"prompt": "a", "completion": 5}]', "record 1: 'completion' must be a string"),
    ("lastuser.json", b'[{"messages": [{"role": "user", "content": "a"}]}]', "last message must be the assistant"),
    ("role.json", b'[{"messages": [{"role": "bot", "content": "a"}]}]', "record 1, message 1: role must be"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES)
def test_bad_files_name_file_record_and_problem(tmp_path, name, content, message):
    with pytest.raises(DataError) as info:
        load_examples_from_file(write(tmp_path, name, content))
    assert message in info.value.message, info.value.message


def test_json_array_and_jsonl_and_object_agree(tmp_path):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    a = load_examples_from_file(write(tmp_path, "a.json", json.dumps(records).encode()))
    b = load_examples_from_file(write(tmp_path, "b.jsonl", "\n".join(map(json.dumps, records)).encode()))
    c = load_examples_from_file(write(tmp_path, "c.json", json.dumps({"training_data": records}).encode()))
    assert data_hash(a) == data_hash(b) == data_hash(c) == data_hash(load_examples(records, "inline"))


def test_loss_only_on_answer_tokens(tokenizer):
    example = Example(1, USER_ANSWER)
    tok = tokenize_example(tokenizer, example, max_seq_length=128, train_on_inputs=False)
    trained = [t for t, label in zip(tok.input_ids, tok.labels) if label != -100]
    assert tokenizer.decode(trained).strip() == "FOR TWO.<|end|>"
    assert tok.labels[: len(tok.labels) - len(trained) - 1] == [-100] * (len(tok.labels) - len(trained) - 1)


def test_train_on_inputs_trains_everything(tokenizer):
    tok = tokenize_example(tokenizer, Example(1, USER_ANSWER), max_seq_length=128, train_on_inputs=True)
    assert tok.labels == tok.input_ids


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    messages = [*USER_ANSWER, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]
    tok = tokenize_example(tokenizer, Example(1, messages), max_seq_length=128, train_on_inputs=False)
    trained = tokenizer.decode([t for t, label in zip(tok.input_ids, tok.labels) if label != -100])
    assert "FOR TWO." in trained and "Yes." in trained and "Again?" not in trained and "42" not in trained


def test_over_long_record_is_named(tokenizer):
    example = Example(3, [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}])
    with pytest.raises(DataError, match=r"record 3: over-long: \d+ tokens > max_seq_length 64"):
        tokenize_example(tokenizer, example, max_seq_length=64, train_on_inputs=False, source="d.json")


def test_plain_template_when_model_has_none(tokenizer):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tok = tokenize_example(tokenizer, Example(1, USER_ANSWER), max_seq_length=128, train_on_inputs=False)
    text = tokenizer.decode(tok.input_ids)
    assert "### Instruction:\nWhat is 42?" in text and "### Response:\nFOR TWO." in text
    trained = tokenizer.decode([t for t, label in zip(tok.input_ids, tok.labels) if label != -100])
    assert trained.startswith("FOR TWO.") and "Instruction" not in trained
