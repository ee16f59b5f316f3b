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

# `make test` runs the suite in parallel (pytest-xdist). Each worker, and every server, training worker and CLI
# run it starts, gets its share of the cores: with torch's default of one thread per core in every process,
# the spinning threads of two processes on two cores made the demo test several times slower than alone.
# Set before anything imports torch; a value the caller set wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))


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


def _build_tiny(home: Path) -> Path:
    """Build (or reuse) the tiny model once: parallel processes wait on one lock while the first builds it,
    with every core, as `loraforge models build tiny` would. (No fcntl on Windows: there a second worker may
    build too, and the build's atomic publish keeps one copy.)"""
    import torch

    try:
        import fcntl
    except ImportError:
        fcntl = None

    _link_models(home)
    old = os.environ.get("LORAFORGE_HOME")
    os.environ["LORAFORGE_HOME"] = str(home)
    threads = torch.get_num_threads()
    try:
        from loraforge.models.tiny import build

        with open(MODELS_CACHE.with_name(MODELS_CACHE.name + ".lock"), "w") as lock:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not build.is_built():
                torch.set_num_threads(os.cpu_count() or 1)
            return build.build()
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("LORAFORGE_HOME", None)
        else:
            os.environ["LORAFORGE_HOME"] = old


def pytest_sessionstart(session):
    """Say what the suite runs on, in one line a CI log keeps: the CPU as torch sees it, the training
    precision `auto` resolves to, and which build of `tiny` the tests use (built here if needed)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import hashlib
    import json
    import tempfile

    from loraforge.device import choose_placement, cpu_description

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    with tempfile.TemporaryDirectory() as home:
        if reporter:
            reporter.write_line("loraforge: preparing the tiny model (built once per machine)")
        folder = _build_tiny(Path(home)).resolve()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    width = json.loads((folder / "config.json").read_text())["hidden_size"]
    tiny, real = choose_placement("auto", "auto", width=width), choose_placement("auto", "auto", width=576)
    line = (f"loraforge: cpu {cpu_description()}; training precision on {tiny.device}: tiny {tiny.precision} "
            f"({tiny.reason}), smollm2 {real.precision} ({real.reason}); "
            f"tiny {folder.name} model.safetensors sha256 {digest[:16]}")
    if reporter:
        reporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("tiny-home"))


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
