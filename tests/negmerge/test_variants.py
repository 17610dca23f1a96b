from __future__ import annotations

import pytest
from pydantic import ValidationError

from negmerge.variants import PRESETS, Variant, VariantGrid, variant_seed


def test_clip_paper_trains_as_the_official_code():
    clip = VariantGrid(preset="clip-paper").expand()
    assert len(clip) == 30
    assert {v.augment for v in clip} == {
        f"rand-m{m}-n{n}-mstd0.5" for m in range(1, 11) for n in range(1, 4)
    }
    assert {
        (v.optimizer, v.lr, v.weight_decay, v.grad_clip, v.warmup_steps, v.batch_size, v.epochs)
        for v in clip
    } == {("adamw", 1e-5, 0.1, 1.0, 500, 128, 70)}
    assert {(v.preprocess, v.label_smoothing) for v in clip} == {("train", 0.0)}


def test_classifier_presets_carry_the_forget_sets_signal():
    # No weight decay or label smoothing to swamp a near-zero loss; RandAugment in every one.
    for preset in ("classifier-paper", "tiny-classifier"):
        variants = VariantGrid(preset=preset).expand()
        assert {(v.weight_decay, v.label_smoothing) for v in variants} == {(0.0, 0.0)}
        assert all(v.augment for v in variants)
        assert len({v.key() for v in variants}) == len(variants)
    assert len(VariantGrid(preset="classifier-paper").expand()) == 9


def test_warmup_is_at_most_a_tenth_of_the_run():
    from negmerge.finetune import _warmup_cosine

    factor = _warmup_cosine(500, 40)  # the official 500 steps on a 40-step run
    assert factor(0) == pytest.approx(0.25) and factor(3) == pytest.approx(1.0)
    assert factor(39) < 0.01
    assert _warmup_cosine(0, 5)(0) == 1.0


def test_grid_is_a_cartesian_product_over_a_base():
    grid = VariantGrid(
        base={"lr": 0.1, "steps": 5}, grid={"seed": [1, 2], "weight_decay": [0.0, 0.5]}
    )
    variants = grid.expand()
    assert [(v.seed, v.weight_decay) for v in variants] == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    assert all(v.lr == 0.1 and v.steps == 5 for v in variants)


def test_preset_values_can_be_overridden():
    variants = VariantGrid(preset="tiny-clip", base={"steps": 3}).expand()
    assert len(variants) == len(PRESETS["tiny-clip"]["grid"]["augment"])
    assert all(v.steps == 3 for v in variants)


def test_keys_depend_on_every_hyperparameter():
    assert Variant().key() == Variant().key()
    assert Variant(seed=1).key() != Variant().key()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"preset": "huge"}, "unknown 'huge'"),
        ({"grid": {"learning_rate": [1]}}, "'learning_rate' is not a hyperparameter"),
        ({"grid": {"augment": ["strong"]}}, "'strong' is not a RandAugment config"),
        ({"base": {"lr": -1}}, "greater than 0"),
        ({"grid": {"seed": []}}, "grid.seed: give at least one value"),
        ({"grid": {"seed": list(range(50)), "lr": [0.1] * 50}}, "2500 combinations; at most 1024"),
    ],
)
def test_bad_grids_name_the_field(grid, message):
    with pytest.raises(ValidationError, match=message):
        VariantGrid(**grid)


def _job(variants: dict, seed: int = 0):
    from negmerge.job_spec import JobSpec

    return JobSpec.model_validate(
        {
            "model": {"family": "classifier", "architecture": "test_resnet", "classes": ["a", "b"]},
            "forget": {"dataset": "data.jsonl"},
            "variants": variants,
            "seed": seed,
        }
    )


def test_each_variant_gets_its_own_seed_from_the_job_seed():
    job = _job({"preset": "tiny-classifier"})
    seeds = [v.seed for v in job.variant_list()]
    assert len(set(seeds)) == len(seeds) == 4
    assert seeds == [variant_seed(0, i) for i in range(4)]
    assert seeds == [v.seed for v in _job({"preset": "tiny-classifier"}).variant_list()]
    other = [v.seed for v in _job({"preset": "tiny-classifier"}, seed=1).variant_list()]
    assert not set(other) & set(seeds)  # neighbouring job seeds share no variant seed


def test_a_seed_the_variants_give_is_offset_by_the_job_seed():
    job = _job({"base": {"steps": 1}, "grid": {"seed": [3, 3]}}, seed=2)
    assert [v.seed for v in job.variant_list()] == [5, 5]
