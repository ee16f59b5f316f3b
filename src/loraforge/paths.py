"""Where files live, and how they are written: inside one root, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from loraforge.errors import LoraforgeError


def home() -> Path:
    """The store root: `LORAFORGE_HOME`, default `~/.loraforge`."""
    root = os.environ.get("LORAFORGE_HOME") or str(Path.home() / ".loraforge")
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def inside(root: Path, *parts: str, what: str | None = None, field: str = "path",
           error: type[LoraforgeError] = LoraforgeError) -> Path:
    """Join `parts` under `root` and refuse any result that escapes it (`..`, absolute, links).

    `what` names the input in the error ("probes file 'x' must be inside suites/").
    """
    root = root.resolve()
    candidate = root.joinpath(*parts).resolve()
    if candidate != root and root not in candidate.parents:
        if what is None:
            raise error("path escapes its root folder", field=field)
        raise error(f"{what} {'/'.join(parts)!r} must be inside {root.name}/", field=field)
    return candidate


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path`, so a following rename publishes complete data."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with open(Path(dirpath) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a fully written `tmp_dir` to `final_dir` (which must not exist), durably."""
    fsync_tree(tmp_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
