"""The twelve synthetic tuning domains: deterministic, disjoint, computable, not trivially guessable."""

from __future__ import annotations

from collections import Counter

import pytest

from loraforge.tune.domains import DOMAINS, Task, accuracy, splits


def test_twelve_domains():
    assert len(DOMAINS) == 12


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_splits_are_deterministic_disjoint_and_sized(domain):
    a, b = splits(domain, seed=3), splits(domain, seed=3)
    assert a == b
    assert splits(domain, seed=4) != a
    assert [len(a[k]) for k in ("train", "validation", "test")] == [64, 32, 32]
    prompts = [t.prompt for part in a.values() for t in part]
    assert len(prompts) == len(set(prompts))


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_answers_are_in_or_computed_from_the_prompt_and_not_one_class(domain):
    tasks = [t for part in splits(domain, seed=0).values() for t in part]
    assert all(t.answer and t.passes(t.answer) and t.passes(f" {t.answer.upper()}. ") for t in tasks)
    counts = Counter(t.answer for t in tasks)
    assert counts.most_common(1)[0][1] / len(tasks) < 0.6  # always answering the commonest label fails


@pytest.mark.parametrize("task, output, passed", [
    (Task("q", "12"), "12", True), (Task("q", "12"), "12.", True), (Task("q", "12"), "112", False),
    (Task("q", "delivered"), "Delivered", True), (Task("q", "Ana"), "Ana got it", False),
])
def test_exact_match_after_normalisation(task, output, passed):
    assert task.passes(output) is passed


def test_accuracy():
    tasks = [Task("a", "1"), Task("b", "2")]
    assert accuracy(tasks, ["1", "3"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(tasks, ["1"])


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_every_domain_has_room_for_the_seed_sweep_sizes(domain):
    """The seed's sweep space asks for 100 training tasks per domain (plus our 32 + 32 held out)."""
    parts = splits(domain, seed=0, train=100, validation=32, test=32)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [100, 32, 32]


def test_asking_for_more_tasks_than_a_domain_has_names_the_field():
    from loraforge.errors import ConfigError

    with pytest.raises(ConfigError, match="hr has fewer than 5000 distinct tasks") as caught:
        splits("hr", seed=0, train=4936)
    assert caught.value.field == "train_size"
