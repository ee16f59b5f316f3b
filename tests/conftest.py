"""Test set-up: every test gets its own store; the built-in tiny model is built once and shared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "seeds" / "configs"
EXAMPLES = ROOT / "examples"
MODELS_CACHE = Path(os.environ.get("LORAFORGE_TEST_MODELS", ROOT / ".cache" / "test-models"))


def _link_models(home: Path) -> None:
    MODELS_CACHE.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    link = home / "models"
    if not link.exists():
        link.symlink_to(MODELS_CACHE, target_is_directory=True)


@pytest.fixture(autouse=True)
def store_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    _link_models(home)
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Build (or reuse) the tiny model once per session."""
    home = tmp_path_factory.mktemp("tiny-home")
    _link_models(home)
    old = os.environ.get("LORAFORGE_HOME")
    os.environ["LORAFORGE_HOME"] = str(home)
    try:
        from loraforge.models.tiny import build

        return build.build()
    finally:
        if old is None:
            os.environ.pop("LORAFORGE_HOME", None)
        else:
            os.environ["LORAFORGE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.eval()
    return model, tokenizer


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
