"""Reading JSON, JSONL and YAML files people write (configs, suites, probes, schedules); errors name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import ConfigError


def read_structured(path: Path) -> Any:
    """JSON, JSONL or YAML from a file, chosen by its suffix; errors name the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"file {path.name!r} not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not UTF-8") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if path.suffix.lower() == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{path.name}: line {number}: invalid JSON: {exc.msg}") from None
            return rows
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: invalid YAML: {str(exc).splitlines()[0]}") from None
