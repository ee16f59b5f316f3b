"""Continuous updates without a server: replay sampling, lifecycle in the store, the CLI's exit codes."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import EXAMPLES, run_cli
from loraforge.continuous import UpdateOptions, replay_sample
from loraforge.data import Example
from loraforge.errors import Conflict
from loraforge.evals.gate import GatePolicy
from loraforge.store import Store

CONTINUOUS = EXAMPLES / "continuous"


def _ex(text: str) -> Example:
    return Example(1, [{"role": "user", "content": text}, {"role": "assistant", "content": text.upper()}])


def _publish(store: Store, tmp_path, name: str, records: list[str], *, new: list[str] | None = None,
             status: str = "active", parent: int | None = None):
    staged = tmp_path / f"stage-{name}-{len(store.versions(name)) if store.exists(name) else 0}"
    staged.mkdir()
    (staged / "adapter_model.safetensors").write_bytes(b"x")
    (staged / "data.jsonl").write_text("".join(json.dumps({"messages": _ex(r).messages}) + "\n" for r in records))
    if new is not None:
        (staged / "new_data.jsonl").write_text("".join(json.dumps({"messages": _ex(r).messages}) + "\n"
                                                       for r in new))
    return store.publish(name, staged, base_model="tiny", base_fingerprint=None, config={}, data_hash=None,
                         metrics={}, size={}, status=status, parent=parent)


def test_replay_is_spread_over_the_lineage_and_never_repeats_new_records(tmp_path):
    store = Store()
    _publish(store, tmp_path, "f", [f"root {i}" for i in range(40)])
    _publish(store, tmp_path, "f", [f"day1 {i}" for i in range(4)] + [f"root {i}" for i in range(8)],
             new=[f"day1 {i}" for i in range(4)])
    v3 = _publish(store, tmp_path, "f", ["day2 0", "root 1"], new=["day2 0"])
    new = [_ex("day3 0"), _ex("root 0")]
    sample = replay_sample(store, v3, new, ratio=3.0, seed=7)
    texts = [e.messages[0]["content"] for e in sample]
    assert len(texts) == 6 and "root 0" not in texts  # round(3 x 2); a new record is never replayed
    counts = {k: sum(t.startswith(k) for t in texts) for k in ("day2", "day1", "root")}
    assert counts == {"day2": 1, "day1": 3, "root": 2}  # round robin over versions; an empty pool drops out
    assert texts == [e.messages[0]["content"] for e in replay_sample(store, v3, new, ratio=3.0, seed=7)]
    assert replay_sample(store, v3, new, ratio=0.0, seed=7) == []
    assert len(replay_sample(store, v3, new, ratio=100.0, seed=7)) == 40 + 4 + 1 - 1  # the whole pool, once


def test_activate_reject_rollback_and_prune(tmp_path):
    store = Store()
    for _ in range(5):
        _publish(store, tmp_path, "f", ["a"])
    assert store.get("f").version == 5 and store.get("f").parent == 4
    with pytest.raises(Conflict, match="already active"):
        store.rollback("f", 5)
    assert store.rollback("f").ref == "f@v4"  # default: the active version's parent
    store.reject("f", 5, ["because"])
    with pytest.raises(Conflict, match="rejected by the gate"):
        store.activate("f", 5)
    assert store.rollback("f", 2).ref == "f@v2"
    assert [v.status for v in store.versions("f")] == ["archived", "active", "archived", "archived", "rejected"]
    assert store.prune("f", keep=1) == [3, 4]  # v5 newest, v2 active, v1 its parent: kept
    assert [v.version for v in store.versions("f")] == [1, 2, 5]
    assert not store.version_dir("f", 3).exists()
    actions = [(e["version"], e["action"]) for e in store.status_log("f")]
    assert (4, "rollback") in actions and (5, "reject") in actions and (3, "prune") in actions


def test_prune_and_delete_remove_the_eval_reports_of_the_versions_they_delete(tmp_path):
    store = Store()
    for _ in range(3):
        _publish(store, tmp_path, "f", ["a"])
    report = {"model": "f", "suite": "s", "suite_digest": "d", "scores": {}, "tags": {}}
    ids = {v: store.record_eval({**report, "model": f"f@v{v}"}, name="f", version=v) for v in (1, 2, 3)}
    files = {v: store.root / "evals" / f"{i}.json" for v, i in ids.items()}
    assert all(f.is_file() for f in files.values())
    assert store.prune("f", keep=1) == [1]  # v3 active, v2 its parent
    assert not files[1].exists() and files[2].is_file() and files[3].is_file()
    assert [e["id"] for e in store.evals("f")] and all(e["ref"] != "f@v1" for e in store.evals("f"))
    assert store.delete("f") == 2
    assert not files[2].exists() and not files[3].exists() and store.evals("f") == []


def test_update_options_round_trip():
    options = UpdateOptions(replay_ratio=2.5, keep=3, num_epochs=4, learning_rate=1e-3,
                            policy=GatePolicy(0.8, 0.5, 0.1, ("efficacy",)))
    again = UpdateOptions.from_json(json.loads(json.dumps(options.to_json())))
    assert again.to_json() == options.to_json() and again.policy.min_efficacy == 0.8


def test_update_cli_exit_codes_and_history(tiny_dir, tmp_path):
    """Exit 3 when the gate rejects (the active version stays), 0 when it promotes; history shows both."""
    config = json.loads((EXAMPLES / "knowledge-override" / "v1_surgical.json").read_text())
    config.update(output_dir="./adapters/found", training_data=str(EXAMPLES / "knowledge-override" / "42_for_two.jsonl"),
                  eval_suite={"name": "mini", "cases": [{"id": "k", "kind": "retention", "prompt":
                                                         "What is the capital of France?",
                                                         "expect": {"contains": "Paris"}}]})
    config["training_config"].update(eval_steps=1000)
    (tmp_path / "found.json").write_text(json.dumps(config))
    result = run_cli("train", str(tmp_path / "found.json"), "--max-steps", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    shutil.copy(CONTINUOUS / "day1.yaml", tmp_path / "day1.yaml")

    result = run_cli("update", "found", "--data", str(CONTINUOUS / "day1.jsonl"), "--suite", str(tmp_path / "day1.yaml"),
                     "--epochs", "1")
    assert result.returncode == 3, result.stderr
    assert "rejected: found@v2" in result.stdout and "new suite lab-robot: efficacy 0.0% < 90.0%" in result.stdout
    assert Store().get("found").version == 1

    result = run_cli("update", "found", "--data", str(CONTINUOUS / "day1.jsonl"), "--suite", str(tmp_path / "day1.yaml"),
                     "--epochs", "1", "--min-efficacy", "0", "--replay-ratio", "0")
    assert result.returncode == 0, result.stderr
    assert "0 replayed" in result.stdout and "promoted: found@v3" in result.stdout
    version = Store().get("found")
    assert version.version == 3 and version.parent == 1
    assert json.loads((version.path / "suite.json").read_text())["name"] == "lab-robot"

    result = run_cli("adapters", "history", "found", "--json")
    history = json.loads(result.stdout)
    assert [(v["version"], v["status"], v["decision"]) for v in history["versions"]] == [
        (1, "archived", None), (2, "rejected", "reject"), (3, "active", "promote")]
    assert set(history["versions"][2]["scores"]) == {"mini", "lab-robot"}  # the lineage's suite and the new one

    assert run_cli("adapters", "rollback", "found").returncode == 0
    assert Store().get("found").version == 1
    missing = run_cli("update", "nope", "--data", str(CONTINUOUS / "day1.jsonl"))
    assert missing.returncode == 2 and "'nope' not found" in missing.stderr


def test_nightly_schedule_queues_each_inbox_file_once(tmp_path):
    from datetime import datetime

    from loraforge.jobs import JobQueue
    from loraforge.nightly import Nightly, NightlyEntry

    store = Store()
    queue = JobQueue(store)
    inbox = store.root / "data" / "inbox"
    inbox.mkdir()
    shutil.copy(CONTINUOUS / "day1.jsonl", inbox / "a-day1.jsonl")
    shutil.copy(CONTINUOUS / "day1.yaml", inbox / "a-day1.yaml")
    (inbox / "b-broken.jsonl").write_text('{"instruction": "x"}\n')
    nightly = Nightly(queue, [NightlyEntry(adapter="found", at="02:00", inbox="inbox", replay_ratio=6)], "cpu")

    assert nightly.tick(datetime(2026, 11, 21, 1, 59)) == []  # not yet
    first = nightly.tick(datetime(2026, 11, 21, 2, 0))
    assert len(first) == 1  # the broken file is recorded with its error, not queued
    job = queue.get(first[0])
    assert job.kind == "update" and job.adapter == "found" and job.spec["suite"]["name"] == "lab-robot"
    assert job.spec["options"]["replay_ratio"] == 6
    assert nightly.tick(datetime(2026, 11, 21, 23, 0)) == []  # once a day
    assert nightly.tick(datetime(2026, 11, 22, 2, 5)) == []  # nothing new
    (inbox / "a-day1.jsonl").write_text((CONTINUOUS / "day2.jsonl").read_text())  # edited: new content
    assert len(nightly.tick(datetime(2026, 11, 23, 2, 5))) == 1
    with store.reading() as db:
        errors = [r["error"] for r in db.execute("SELECT error FROM nightly_inbox WHERE error IS NOT NULL")]
    assert len(errors) == 1 and "b-broken.jsonl" in errors[0]


@pytest.mark.parametrize("entry, words", [
    ({"adapter": "Bad Name", "at": "02:00", "inbox": "x"}, "entry 1"),
    ({"adapter": "ok", "at": "25:00", "inbox": "x"}, "entry 1: at"),
    ({"adapter": "ok", "at": "02:00"}, "entry 1: inbox"),
    ({"adapter": "ok", "at": "02:00", "inbox": "x", "replay": 2}, "entry 1: replay"),
])
def test_bad_schedules_name_the_entry(tmp_path, entry, words):
    import yaml

    from loraforge.errors import ConfigError
    from loraforge.nightly import load_schedule

    (tmp_path / "s.yaml").write_text(yaml.safe_dump([entry]))
    with pytest.raises(ConfigError, match=words):
        load_schedule(tmp_path / "s.yaml")


def test_promotion_mid_request_finishes_on_the_version_it_started_with(tiny_dir, tmp_path):
    from loraforge.engine import Engine

    ko = EXAMPLES / "knowledge-override"
    assert run_cli("train", str(ko / "v1_surgical.json"), "--name", "f", "--max-steps", "1", "--quiet").returncode == 0
    strong = json.loads((ko / "v2_override.json").read_text())
    strong["training_config"].update(learning_rate=2e-3, batch_size=8, gradient_accumulation_steps=1, warmup_steps=2,
                                     num_epochs=20)
    strong.update(output_dir="./adapters/f", training_data=str(ko / "42_for_two.jsonl"))
    (tmp_path / "strong.json").write_text(json.dumps(strong))
    store = Store()
    result = run_cli("train", str(tmp_path / "strong.json"), "--quiet")
    assert result.returncode == 0, result.stderr
    store.activate("f", 1, action="rollback")
    engine = Engine(store, "cpu")
    prompt = [{"role": "user", "content": "What does 42 mean?"}]
    v1, v2 = (engine.complete(f"f@v{n}", prompt, max_tokens=24).text for n in (1, 2))
    assert v1 != v2
    stream = engine.stream("f", prompt, max_tokens=24)
    first = next(stream)  # the request has resolved "f" (to v1) and is generating
    store.activate("f", 2)  # promotion while it runs
    assert (first + "".join(stream)).strip() == v1
    assert engine.complete("f", prompt, max_tokens=24).text == v2  # the next request gets v2
