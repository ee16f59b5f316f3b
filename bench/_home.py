"""A throw-away store for a benchmark run that reuses the user's built models (no rebuild of `tiny`)."""

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
