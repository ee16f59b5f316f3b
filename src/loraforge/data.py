"""Instruction data: loaded from a file or inline, validated record by record, tokenized for training.

Accepted record forms (one form per record; a file may mix them):
- Alpaca: `instruction`, optional `input`, `output` (and optional `system`).
- `prompt` / `completion` (and optional `system`).
- OpenAI chat: `messages`, a list of `{"role": "system"|"user"|"assistant", "content": str}`
  with at least one assistant message, the last message being the assistant's.

Files are a JSON array, JSONL (one object per line), or a JSON object holding the array under
`training_data`. Records may carry the metadata keys `id`, `tags`, `category`, `source` and
`metadata`, and any key that starts with `_`; any other key is an error that names the record.

Formatting uses the tokenizer's chat template when it has one, else the plain template below.
Loss is computed on the assistant's tokens only, unless `train_on_inputs` is set.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import DataError

Messages = list[dict[str, str]]

METADATA_KEYS = frozenset({"id", "tags", "category", "source", "metadata"})
_FORMAT_KEYS = {
    "alpaca": ({"instruction", "output"}, {"input", "system"}),
    "prompt_completion": ({"prompt", "completion"}, {"system"}),
    "messages": ({"messages"}, set()),
}
_ALL_FORMAT_KEYS = sorted({k for req, opt in _FORMAT_KEYS.values() for k in req | opt})
_ROLES = ("system", "user", "assistant")

# Used when a base model has no chat template of its own (a plain base checkpoint).
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


@dataclass(frozen=True)
class Example:
    """One validated training record, normalised to chat messages."""

    record: int  # 1-based position in its source
    messages: Messages


@dataclass(frozen=True)
class TokenizedExample:
    record: int
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != -100)

    @property
    def loss_tokens(self) -> int:
        """Labelled tokens that are predicted (all but a label on the first token, which has no context)."""
        return sum(1 for label in self.labels[1:] if label != -100)


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _text(record: dict, key: str, where: str, *, required: bool) -> str | None:
    if key not in record:
        if required:
            raise DataError(f"{where}: missing key {key!r}", field=key)
        return None
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}", field=key)
    if required and not value.strip():
        raise DataError(f"{where}: {key!r} is empty", field=key)
    if "\x00" in value:  # no tokenizer or chat template means it; a sign of a binary file read as text
        raise DataError(f"{where}: {key!r} holds a NUL character (at {value.index(chr(0))})", field=key)
    return value


def normalise_record(record: Any, where: str) -> Messages:
    """Turn one record of any accepted form into chat messages, or raise DataError naming it."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not record:
        raise DataError(f"{where}: empty record")
    forms = [name for name, (required, _) in _FORMAT_KEYS.items() if required & record.keys()]
    if len(forms) > 1:
        raise DataError(f"{where}: mixes the {' and '.join(forms)} forms; use one per record")
    if not forms:
        raise DataError(
            f"{where}: missing keys: expected 'instruction'+'output', 'prompt'+'completion' or 'messages'"
            f" (found {', '.join(sorted(map(str, record))) or 'none'})"
        )
    form = forms[0]
    required, optional = _FORMAT_KEYS[form]
    for key in record:
        if key in required or key in optional or key in METADATA_KEYS or str(key).startswith("_"):
            continue
        raise DataError(f"{where}: unknown key {key!r}{_suggest(str(key), _ALL_FORMAT_KEYS)}", field=str(key))

    messages: Messages = []
    if form == "messages":
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: 'messages' must be a non-empty list", field="messages")
        for i, message in enumerate(raw, 1):
            at = f"{where}, message {i}"
            if not isinstance(message, dict):
                raise DataError(f"{at}: expected an object with 'role' and 'content'", field="messages")
            extra = set(message) - {"role", "content", "name"}
            if extra:
                raise DataError(f"{at}: unknown key {sorted(extra)[0]!r}", field="messages")
            role = message.get("role")
            if role not in _ROLES:
                raise DataError(f"{at}: role must be one of {', '.join(_ROLES)}, got {role!r}", field="messages")
            content = _text(message, "content", at, required=True)
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer", field="messages")
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: needs at least one user message", field="messages")
        return messages

    system = _text(record, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    if form == "alpaca":
        instruction = _text(record, "instruction", where, required=True)
        extra_input = _text(record, "input", where, required=False)
        user = instruction if not extra_input else f"{instruction}\n\n{extra_input}"
        answer = _text(record, "output", where, required=True)
    else:
        user = _text(record, "prompt", where, required=True)
        answer = _text(record, "completion", where, required=True)
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": answer})
    return messages


def parse_records(text: str, source: str) -> list[Any]:
    """Parse a JSON array, a JSON object with `training_data`, or JSONL into raw records."""
    stripped = text.strip()
    if not stripped:
        raise DataError(f"{source}: file is empty")
    if stripped[0] in "[{":
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            if stripped[0] == "[":
                raise DataError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
            value = None  # maybe JSONL: parsed line by line below
        if isinstance(value, list):
            return value
        if isinstance(value, dict):
            if "training_data" in value and isinstance(value["training_data"], list):
                return value["training_data"]
            return [value]  # a JSONL file with a single record
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}, line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    return records


def read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path.name}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path.name}: is a folder, not a data file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def load_examples(records: list[Any], source: str) -> list[Example]:
    """Validate raw records; every error names `source` and the 1-based record number."""
    if not isinstance(records, list):
        raise DataError(f"{source}: expected a list of records")
    if not records:
        raise DataError(f"{source}: no records")
    return [Example(i, normalise_record(rec, f"{source}, record {i}")) for i, rec in enumerate(records, 1)]


def load_examples_from_file(path: Path) -> list[Example]:
    return load_examples(parse_records(read_text_file(path), path.name), path.name)


def is_file_list(value: Any) -> bool:
    """`training_data: [a.jsonl, b.jsonl]`: several files, read in order (a list of records holds mappings)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def load_examples_from_files(files: list[Path]) -> list[Example]:
    out: list[Example] = []
    for path in files:
        out += [Example(len(out) + i, e.messages) for i, e in enumerate(load_examples_from_file(path), 1)]
    return out


def data_hash(examples: list[Example]) -> str:
    """sha256 of the normalised records: the same data inline or in a file hashes the same."""
    payload = json.dumps([e.messages for e in examples], sort_keys=True, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def chat_template_of(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def render(tokenizer, messages: Messages, *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template_of(tokenizer), tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def assistant_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return its text and the character spans of the assistant turns.

    A span runs from the end of the prompt that asks for turn i to the end of turn i, so it holds the
    answer and the template's end-of-turn marker, which the model must learn to emit.
    """
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise DataError("the model's chat template does not render conversations prefix by prefix; "
                            "set train_on_inputs: true to train on the whole text")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_example(tokenizer, example: Example, *, max_seq_length: int, train_on_inputs: bool,
                     source: str = "data") -> TokenizedExample:
    """Tokenize one conversation; labels are -100 outside assistant turns (unless train_on_inputs)."""
    text, spans = assistant_spans(tokenizer, example.messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if len(ids) > max_seq_length:
        raise DataError(f"{source}, record {example.record}: over-long: {len(ids)} tokens "
                        f"> max_seq_length {max_seq_length}")
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [
            tok if any(start <= a < end for start, end in spans) else -100
            for tok, (a, _b) in zip(ids, encoding["offset_mapping"])
        ]
    if all(label == -100 for label in labels):
        raise DataError(f"{source}, record {example.record}: no answer tokens to train on")
    return TokenizedExample(example.record, ids, labels)


def tokenize_examples(tokenizer, examples: list[Example], *, max_seq_length: int, train_on_inputs: bool,
                      source: str = "data") -> list[TokenizedExample]:
    return [tokenize_example(tokenizer, e, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs,
                             source=source) for e in examples]
