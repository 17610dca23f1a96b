"""The fine-tuning data path: the same tau whatever the loader workers and the decoded cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from negmerge.context import JobContext
from negmerge.errors import DataError
from negmerge.finetune import finetune_task_vector, prepare_images
from negmerge.fixtures import ensure_tiny_classifier
from negmerge.fixtures.jobs import forget_class_job
from negmerge.io import load_state_dict
from negmerge.job_spec import JobSpec
from negmerge.loading import EpochBatches, LoaderOptions, TrainingImages
from negmerge.pipeline import finetune_variant, merge_variants
from negmerge.variants import Variant

# Both random parts of the pipeline: torch's (crop, flip) and Python's and NumPy's (RandAugment).
VARIANT = Variant(
    optimizer="sgd", lr=0.05, steps=2, batch_size=8, augment="rand-m9-n2", preprocess="train"
)
NO_CACHE = LoaderOptions(num_workers=0, decoded_cache_bytes=0)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    classifier = ensure_tiny_classifier()
    spec = JobSpec.model_validate(forget_class_job(classifier, "three"))
    return JobContext.load(spec, tmp_path_factory.mktemp("job"))


def tau(ctx, options: LoaderOptions, variant: Variant = VARIANT, **kw) -> dict[str, torch.Tensor]:
    forget = ctx.splits["forget"]
    return finetune_task_vector(
        ctx.model, ctx.forget_manifest, forget, variant, "cpu", loader_options=options, **kw
    )


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tau_is_the_same_bit_for_bit_whatever_the_number_of_loader_workers(ctx):
    alone = tau(ctx, NO_CACHE)
    assert any(bool(v.abs().sum() > 0) for v in alone.values())  # it trained
    for workers in (1, 2):
        assert same(tau(ctx, LoaderOptions(num_workers=workers, decoded_cache_bytes=0)), alone)


def test_decoded_images_give_the_same_tau_as_decoding_every_time(ctx):
    decoded_each_time = tau(ctx, NO_CACHE)
    kept = prepare_images(ctx.model, ctx.forget_manifest, ctx.splits["forget"], NO_CACHE)
    assert not kept.arrays  # a bound of 0 keeps nothing
    full = LoaderOptions(num_workers=2)
    everything = prepare_images(ctx.model, ctx.forget_manifest, ctx.splits["forget"], full)
    assert len(everything.arrays) == len(ctx.splits["forget"])
    assert same(tau(ctx, full), decoded_each_time)
    # A bound that holds only some images: the rest are decoded as they are needed.
    half = everything.nbytes // 2
    partly = LoaderOptions(num_workers=0, decoded_cache_bytes=half)
    some = prepare_images(ctx.model, ctx.forget_manifest, ctx.splits["forget"], partly)
    assert 0 < some.nbytes <= half and len(some.arrays) < len(everything.arrays)
    assert same(tau(ctx, partly, decoded=some), decoded_each_time)


def test_different_seeds_still_train_apart_and_each_step_reports_its_rate(ctx):
    steps = []
    base = tau(ctx, NO_CACHE, on_step=lambda *reported: steps.append(reported))
    assert [(step, total) for step, total, _, _ in steps] == [(1, 2), (2, 2)]
    assert all(loss > 0 and rate > 0 for _, _, loss, rate in steps)  # images per second
    other = tau(ctx, NO_CACHE, VARIANT.model_copy(update={"seed": 7}))
    assert not same(base, other)


def test_a_sample_is_augmented_the_same_in_any_order_without_moving_the_training_stream(ctx):
    pipeline = ctx.model.train_pipeline("rand-m9-n2", "train")
    forget = ctx.splits["forget"]
    data = TrainingImages(ctx.forget_manifest, forget, ctx.model.classes, pipeline, seed=3)
    torch.manual_seed(0)
    expected_next = torch.rand(4)
    torch.manual_seed(0)
    first, _ = data[(0, 5)]
    data[(0, 2)]
    again, _ = data[(0, 5)]
    assert torch.equal(first, again)
    assert torch.equal(torch.rand(4), expected_next)  # dropout's stream is not moved
    later, _ = data[(1, 5)]
    assert not torch.equal(first, later)  # another epoch, other draws


def test_batches_are_epochs_of_permutations_cut_as_a_shuffling_loader_cuts_them():
    batches = list(EpochBatches(size=10, batch_size=4, seed=1, steps=5))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]
    first_epoch = [i for batch in batches[:3] for epoch, i in batch if epoch == 0]
    assert sorted(first_epoch) == list(range(10))
    assert {epoch for epoch, _ in batches[3]} == {1}
    assert batches == list(EpochBatches(size=10, batch_size=4, seed=1, steps=5))
    assert batches != list(EpochBatches(size=10, batch_size=4, seed=2, steps=5))


def test_the_job_decodes_its_forget_set_once_shares_it_and_deletes_it_once_merged(tmp_path):
    classifier = ensure_tiny_classifier()
    job = forget_class_job(classifier, "three")
    job["variants"] = {"base": {"steps": 2, "batch_size": 8, "augment": "rand-m5-n2"}}
    job["variants"]["grid"] = {"lr": [0.05, 0.02]}
    spec = JobSpec.model_validate(job)
    first = JobContext.load(spec, tmp_path / "job")
    first.workdir.claim(spec)
    finetune_variant(first, 0)
    assert first.workdir.decoded.exists()
    # Another worker process (a fresh context) reads the file instead of decoding again.
    second = JobContext.load(spec, tmp_path / "job")
    shared = second.decoded_forget_set()
    own = first.decoded_forget_set()
    assert shared.arrays.keys() == own.arrays.keys() and len(shared.arrays) > 0
    assert all(np.array_equal(shared.arrays[i], own.arrays[i]) for i in own.arrays)
    record = finetune_variant(second, 1)
    # The same task vector as a job that keeps nothing decoded.
    bare = JobContext.load(spec, tmp_path / "bare", LoaderOptions(decoded_cache_bytes=0))
    bare.workdir.claim(spec)
    assert same(load_state_dict(finetune_variant(bare, 1).path), load_state_dict(record.path))
    assert not bare.workdir.decoded.exists()
    merge_variants(second)
    assert not first.workdir.decoded.exists()


def test_an_unreadable_image_in_a_loader_process_is_named_plainly(ctx, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ctx.forget_manifest.root, root)
    broken = ctx.splits["forget"][3]
    (root / broken.path).write_bytes(b"not an image")
    manifest = type(ctx.forget_manifest).load(root)
    chosen = {s.id for s in ctx.splits["forget"][:8]}
    forget = [s for s in manifest.samples if s.id in chosen]  # one batch
    options = LoaderOptions(num_workers=2, decoded_cache_bytes=0)
    epoch = VARIANT.model_copy(update={"steps": None, "epochs": 1})  # every image is read
    with pytest.raises(DataError) as caught:
        finetune_task_vector(ctx.model, manifest, forget, epoch, "cpu", loader_options=options)
    assert str(caught.value).startswith(f"sample {broken.id!r}: ")
    assert "Traceback" not in str(caught.value)
