"""Escalation: which variants a further round trains and merges, and when a round may follow."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from negmerge.escalation import Escalation
from negmerge.job_spec import JobSpec
from negmerge.variants import Variant

FIRST = [Variant(epochs=3, augment="rand-m1-n1"), Variant(steps=7, augment="rand-m9-n2")]


def spec(**escalation) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"family": "classifier", "architecture": "resnet10t", "classes": ["a", "b"]},
            "forget": {"dataset": "/data/manifest.csv", "classes": ["a"]},
            "variants": {"grid": {"augment": ["rand-m1-n1", "rand-m9-n2"]}},
            "escalation": escalation,
            "seed": 5,
        }
    )


def test_more_trains_the_same_hyperparameters_and_merges_every_round():
    escalation = Escalation(rounds=2, strategy="more")
    assert escalation.round_variants(FIRST, 2) == FIRST
    assert list(escalation.merged_indices(2, 0)) == [0, 1]
    assert list(escalation.merged_indices(2, 2)) == [0, 1, 2, 3, 4, 5]


def test_longer_doubles_each_round_and_merges_its_own():
    escalation = Escalation(rounds=2, strategy="longer")
    round_2 = escalation.round_variants(FIRST, 2)
    assert [(v.epochs, v.steps) for v in round_2] == [(12, None), (1, 28)]
    assert [v.augment for v in round_2] == [v.augment for v in FIRST]
    assert list(escalation.merged_indices(2, 2)) == [4, 5]


def test_rounds_are_numbered_on_and_every_variant_has_its_own_seed():
    job = spec(rounds=2)
    rounds = [job.round_variants(r) for r in range(3)]
    assert [[i for i, _ in r] for r in rounds] == [[0, 1], [2, 3], [4, 5]]
    seeds = [v.seed for r in rounds for _, v in r]
    assert len(set(seeds)) == 6
    assert job.variant_list() == [v for _, v in rounds[0]]
    assert job.variant_at(3) == rounds[1][1][1]
    assert [i for i, _ in job.merged_variants(2)] == [0, 1, 2, 3, 4, 5]
    # Reproducible: the same job gives the same seeds.
    assert [v.seed for _, v in spec(rounds=2).round_variants(1)] == seeds[2:4]


def test_the_next_round_waits_for_the_budget():
    assert Escalation(rounds=0).next_round(0, 4, [10.0]) == "the request allows 0 further round(s)"
    assert Escalation(rounds=2).next_round(0, 4, [10.0]) is None
    assert Escalation(rounds=2).next_round(2, 4, [10.0] * 3) is not None
    assert "max_variants=10" in Escalation(rounds=2, max_variants=10).next_round(1, 4, [1, 1])
    assert Escalation(rounds=2, max_variants=12).next_round(1, 4, [1, 1]) is None
    # `more` estimates the next round at the last one's cost, `longer` at twice it.
    assert Escalation(rounds=1, max_finetune_seconds=20).next_round(0, 4, [10.0]) is None
    refused = Escalation(rounds=1, strategy="longer", max_finetune_seconds=20)
    assert "about 30 s" in refused.next_round(0, 4, [10.0])


@pytest.mark.parametrize(
    "bad", [{"rounds": 4}, {"rounds": -1}, {"strategy": "harder"}, {"max_variants": 0}]
)
def test_bad_escalations_are_refused(bad):
    with pytest.raises(ValidationError):
        Escalation.model_validate(bad)
