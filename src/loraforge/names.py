"""Adapter and model names: checked before any path is built from them.

`name` means the active version of an adapter, `name@v3` an exact version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraforge.errors import InvalidName

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_PATTERN = re.compile(r"^v([1-9][0-9]{0,8})$")


def check_name(name: object, what: str = "name") -> str:
    """Return `name` if it is a valid name, else raise InvalidName saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a string", field=what)
    if not NAME_PATTERN.fullmatch(name) or name in {".", ".."} or ".." in name:
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise InvalidName(
            f"invalid {what} {shown!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit",
            field=what,
        )
    return name


@dataclass(frozen=True)
class AdapterRef:
    """A parsed `name` or `name@vN` reference."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@v{self.version}"


def parse_ref(text: object, what: str = "adapter") -> AdapterRef:
    """Parse `name` or `name@vN`; both parts are validated."""
    if not isinstance(text, str):
        raise InvalidName(f"{what} must be a string", field=what)
    name, sep, version = text.partition("@")
    check_name(name, what)
    if not sep:
        return AdapterRef(name)
    match = _VERSION_PATTERN.fullmatch(version)
    if not match:
        raise InvalidName(f"invalid version {version!r} in {what} {text!r}: expected v1, v2, ...", field=what)
    return AdapterRef(name, int(match.group(1)))
