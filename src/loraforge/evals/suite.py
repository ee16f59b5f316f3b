"""Knowledge suites: cases with matchers, of three kinds — target, paraphrase, retention.

A suite is a YAML or JSON file:

    name: for-two
    cases:
      - id: meaning
        kind: target            # target | paraphrase | retention
        prompt: What does 42 mean?        # or messages: [{role, content}, ...]
        expect: {all_of: [FOR TWO, collaborative intelligence]}
        tags: [for-two]
    retention:                  # optional: retention from a base snapshot instead of hand labels
      probes: builtin           # or a probes file (JSON/JSONL/YAML of {id, prompt, answer?, tags?}) next to the suite
      exclude_tags: ["42"]      # probes of the facts this adapter is meant to change

Matchers (all given ones must hold) compare *normalised* text: Unicode NFKC, case folded, runs of
whitespace collapsed to one space, surrounding whitespace and trailing `.`, `!`, `?` removed.
`regex` is the exception: it searches the raw output (use `(?i)` for case-insensitive).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge import paths
from loraforge.errors import ConfigError
from loraforge.structured import read_structured

KINDS = ("target", "paraphrase", "retention")
SCORE_NAMES = {"target": "efficacy", "paraphrase": "generalization", "retention": "retention"}
MATCHERS = ("contains", "all_of", "any_of", "not_contains", "regex", "exact")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    return text.rstrip(".!? ").strip()


class Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    contains: str | list[str] | None = None
    all_of: list[str] | None = None
    any_of: list[str] | None = None
    not_contains: str | list[str] | None = None
    regex: str | None = None
    exact: str | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @field_validator("all_of", "any_of")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must list at least one string")
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> Expect:
        if all(getattr(self, name) is None for name in MATCHERS):
            raise ValueError(f"expect needs at least one matcher: {', '.join(MATCHERS)}")
        return self

    def check(self, output: str) -> bool:
        text = normalise(output)

        def listed(value: str | list[str] | None) -> list[str]:
            return [] if value is None else [value] if isinstance(value, str) else value

        if any(normalise(s) not in text for s in listed(self.contains) + (self.all_of or [])):
            return False
        if self.any_of is not None and not any(normalise(s) in text for s in self.any_of):
            return False
        if any(normalise(s) in text for s in listed(self.not_contains)):
            return False
        if self.regex is not None and re.search(self.regex, output) is None:
            return False
        return self.exact is None or text == normalise(self.exact)


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    kind: Literal["target", "paraphrase", "retention"]
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    expect: Expect
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_prompt(self) -> Case:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None:
            if not self.messages or self.messages[-1].get("role") != "user":
                raise ValueError("messages must end with a user message")
            for i, m in enumerate(self.messages):
                if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
                    raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content}}")
        return self

    def chat(self) -> list[dict[str, str]]:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt or ""}]


class RetentionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    probes: str = "builtin"
    exclude_tags: list[str] = Field(default_factory=list, description="skip probes with these tags (facts "
                                    "the adapter is meant to change)")
    tags: list[str] = Field(default_factory=lambda: ["retention"])


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    description: str = ""
    cases: list[Case] = Field(default_factory=list)
    retention: RetentionSpec | None = None
    source_dir: str | None = None  # where relative probe files are found

    def digest(self) -> str:
        payload = json.dumps(self.model_dump(mode="json", exclude={"source_dir"}), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _case_label(raw: Any, index: int) -> str:
    case_id = raw.get("id") if isinstance(raw, dict) else None
    return f"cases[{index}]" + (f" (id {case_id!r})" if case_id else "")


def parse_suite(raw: Any, *, source: str = "suite", source_dir: Path | None = None) -> Suite:
    """Validate a suite; every error names the case (index and id) and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a suite must be a mapping with name and cases")
    cases = raw.get("cases", [])
    if not isinstance(cases, list):
        raise ConfigError(f"{source}: cases must be a list", field="cases")
    for index, case in enumerate(cases):
        try:
            Case.model_validate(case)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{source}: {_case_label(case, index)}: {where + ': ' if where else ''}{message}",
                              field=f"cases[{index}]{'.' + where if where else ''}") from None
    try:
        fields = {**raw, "source_dir": str(source_dir)} if source_dir else raw
        suite = Suite.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {where}: {err['msg'].removeprefix('Value error, ')}", field=where) from None
    seen: set[str] = set()
    for index, case in enumerate(suite.cases):
        if case.id in seen:
            raise ConfigError(f"{source}: cases[{index}]: duplicate id {case.id!r}", field=f"cases[{index}].id")
        seen.add(case.id)
    if not suite.cases and suite.retention is None:
        raise ConfigError(f"{source}: the suite has no cases and no retention probes", field="cases")
    return suite


def load_suite(path: Path) -> Suite:
    path = Path(path)
    return parse_suite(read_structured(path), source=path.name, source_dir=path.resolve().parent)


def resolve_suite(value: Any, base_dir: Path, *, field: str = "eval_suite", contain: bool = True) -> Suite:
    """A suite given inline (a mapping) or as a file path relative to `base_dir`.

    With `contain` (input from the network) the file must lie inside `base_dir`; the CLI reads the user's
    own files and passes False. Relative probe files of an inline suite are looked up in `base_dir`,
    never in a folder the input names.
    """
    if isinstance(value, dict):
        return parse_suite({k: v for k, v in value.items() if k != "source_dir"}, source=field, source_dir=base_dir)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a suite file path or an inline suite", field=field)
    if not contain:
        return load_suite((base_dir / value).resolve())
    return load_suite(paths.inside(base_dir, value, what=field, field=field))  # 400, as every path escape
