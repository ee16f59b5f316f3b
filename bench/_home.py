"""Helpers shared by the benchmarks: a throw-away store, the command line, and writing the table doc."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def scratch_home(prefix: str) -> Path:
    """Point LORAFORGE_HOME at a new temporary store whose `models/` is the current store's."""
    from loraforge import paths

    models = paths.home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=prefix))
    (home / "models").symlink_to(models, target_is_directory=True)
    os.environ["LORAFORGE_HOME"] = str(home)
    return home


NOTES_MARKER = "<!-- notes below are kept when the benchmark writes this file again -->"


def command(script: str) -> str:
    """The exact command line that produced a table, for the docs."""
    import shlex
    import sys

    return shlex.join([".venv/bin/python", f"bench/{script}"] + sys.argv[1:])


def write_doc(out: str, lines: list[str]) -> None:
    """Write a benchmark's table to `out` and print it; hand-written notes after NOTES_MARKER survive."""
    path = Path(out)
    kept = ""
    if path.is_file() and NOTES_MARKER in path.read_text():
        kept = NOTES_MARKER + path.read_text().split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print("\n".join(lines))
