import pytest

from loraforge.errors import InvalidName
from loraforge.names import AdapterRef, check_name, parse_ref
from loraforge.paths import inside
from loraforge.errors import LoraforgeError


@pytest.mark.parametrize("name", ["a", "tron_collaborative_intelligence_v1", "for-two.v2", "0abc", "a" * 64])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "%2e%2e%2f", "/abs", "A", "-x", "_x", ".x", "a/b", "a\\b", "a b",
                                  "a" * 65, "x" * 300, "a..b", "é", None, 3])
def test_invalid_names(name):
    with pytest.raises(InvalidName):
        check_name(name)


@pytest.mark.parametrize("text, expected", [
    ("for-two", AdapterRef("for-two")),
    ("for-two@v3", AdapterRef("for-two", 3)),
    ("a@v12", AdapterRef("a", 12)),
])
def test_parse_ref(text, expected):
    assert parse_ref(text) == expected


@pytest.mark.parametrize("text", ["a@3", "a@v0", "a@v", "a@vx", "../a@v1", "a@v1@v2", "@v1"])
def test_parse_ref_rejects(text):
    with pytest.raises(InvalidName):
        parse_ref(text)


@pytest.mark.parametrize("parts", [("..",), ("a", "..", ".."), ("/etc",)])
def test_inside_refuses_escape(tmp_path, parts):
    with pytest.raises(LoraforgeError):
        inside(tmp_path, *parts)


def test_inside_accepts_child(tmp_path):
    assert inside(tmp_path, "a", "b") == (tmp_path / "a" / "b").resolve()
