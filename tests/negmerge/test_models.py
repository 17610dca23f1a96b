"""check_weights: a checkpoint that would not load into its architecture is refused up front,
naming the first key that does not fit, without loading either."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from negmerge.errors import CheckpointError, NegMergeError
from negmerge.fixtures import ensure_tiny_classifier, ensure_tiny_clip
from negmerge.fixtures.jobs import forget_class_job, forget_domain_job
from negmerge.io import load_state_dict, save_file
from negmerge.models import ModelSpec, check_weights, load_model


@pytest.fixture(scope="module")
def classifier() -> ModelSpec:
    return ModelSpec(**forget_class_job(ensure_tiny_classifier())["model"])


@pytest.fixture(scope="module")
def clip() -> ModelSpec:
    return ModelSpec(**forget_domain_job(ensure_tiny_clip())["model"])


def test_weights_that_load_pass(classifier: ModelSpec, clip: ModelSpec) -> None:
    for spec in (classifier, clip):
        check_weights(spec)
        load_model(spec)  # and they do load, strictly


def test_other_architectures_weights_name_the_first_missing_key(
    classifier: ModelSpec, clip: ModelSpec
) -> None:
    with pytest.raises(NegMergeError, match=r"does not fit resnet18: missing key 'conv1.weight'"):
        check_weights(classifier.model_copy(update={"architecture": "resnet18"}))
    crossed = clip.model_copy(update={"weights": classifier.weights})
    with pytest.raises(NegMergeError, match=r"does not fit negmerge-tiny-clip: missing key"):
        check_weights(crossed)


def test_a_wrong_shape_or_an_extra_key_is_named(classifier: ModelSpec, tmp_path) -> None:
    fewer_classes = classifier.model_copy(update={"classes": classifier.classes[:2]})
    with pytest.raises(
        NegMergeError, match=r"key 'fc.weight' is shaped \[10, \d+\], the model's \[2, "
    ):
        check_weights(fewer_classes)
    state = load_state_dict(classifier.weights)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(NegMergeError, match=r"unexpected key 'extra.weight'"):
        check_weights(
            classifier.model_copy(update={"weights": str(tmp_path / "extra.safetensors")})
        )


def test_a_file_that_is_not_a_checkpoint_is_a_checkpoint_error(
    classifier: ModelSpec, tmp_path
) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a safetensors or PyTorch file"):
        check_weights(classifier.model_copy(update={"weights": str(junk)}))


def test_what_torch_accepts_passes_and_bad_arguments_do_not(
    classifier: ModelSpec, tmp_path
) -> None:
    state = load_state_dict(classifier.weights)
    older = {key: value for key, value in state.items() if "num_batches_tracked" not in key}
    save_file(older, tmp_path / "older.safetensors")  # BatchNorm fills the counter in
    check_weights(classifier.model_copy(update={"weights": str(tmp_path / "older.safetensors")}))
    with pytest.raises(NegMergeError, match=r"^init_args.bogus: 'bogus' is not a parameter of"):
        check_weights(classifier.model_copy(update={"init_args": {"bogus": 1}}))


def test_a_custom_config_never_stands_in_for_another_architecture(clip: ModelSpec) -> None:
    """open_clip's registry is the process's: a tenant's config named like a built-in (or
    like a path) must not change what that name builds for anyone else, nor write outside
    the configs folder."""
    rn50 = ModelSpec(family="open_clip", architecture="RN50", classes=["a", "b"])
    as_rn50 = clip.model_copy(update={"architecture": "RN50"})
    escaping = clip.model_copy(update={"architecture": "../escaped"})
    for spec in (as_rn50, escaping):
        check_weights(spec)  # the tiny CLIP's weights fit its own config, whatever its name
    with pytest.raises(NegMergeError, match="does not fit RN50"):
        check_weights(rn50.model_copy(update={"weights": clip.weights}))
    assert not (Path(tempfile.gettempdir()) / "escaped.json").exists()
