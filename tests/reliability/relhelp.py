"""The reliability suite's helpers: its keyed server (the tables use tests/test_server.py's `input_server`), what every refusal must be, the store's files before and after.
(A module, not a conftest.py: a second conftest module would shadow tests/conftest.py.)"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

import pytest

from server import ServerProcess

REPO = Path(__file__).resolve().parents[2]


def tree(home: Path) -> list[str]:
    """The store's files, less the linked models and what comes and goes by itself (SQLite's WAL, the log)."""
    transient = {"server.log", "store.db-shm", "store.db-wal"}
    return sorted(p.relative_to(home).as_posix() for p in home.rglob("*")
                  if "models" not in p.relative_to(home).parts and p.name not in transient)


def assert_refusal(response, statuses=(400, 404, 409, 413, 422), *, home: Path | None = None, words: str = "",
                   echo: str = ""):
    """A refusal: the expected status, the error's JSON shape, its reason, and nothing that helps an attacker
    (no absolute path, no user name, no traceback). `echo`: the request's own text, which may be quoted back."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    text = response.text.replace(json.dumps(echo)[1:-1], "") if echo else response.text
    assert "Traceback" not in text and 'File "' not in text, text
    leaks = [str(REPO), str(Path.home()), "/tmp/", os.sep + "root" + os.sep]
    if home is not None:
        leaks.append(str(home))
    user = getpass.getuser()
    assert not any(leak in text for leak in leaks), text
    assert f"/{user}/" not in text and f"'{user}'" not in text, text
    if words:
        assert words in body["error"]["message"], body
    return body


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_dir):
    from conftest import _link_models

    home = tmp_path_factory.mktemp("keyed-home")
    _link_models(home)
    srv = ServerProcess(home, env={"LORAFORGE_API_KEY": "sekret"})
    yield srv
    srv.stop()
