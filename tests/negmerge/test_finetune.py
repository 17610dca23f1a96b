"""Fine-tuning one variant: how batch norm layers normalise while it trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from negmerge.context import JobContext
from negmerge.finetune import finetune_task_vector
from negmerge.fixtures import ensure_tiny_classifier
from negmerge.fixtures.jobs import forget_class_job
from negmerge.job_spec import JobSpec
from negmerge.variants import Variant


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    spec = JobSpec.model_validate(forget_class_job(ensure_tiny_classifier(), "three"))
    return JobContext.load(spec, tmp_path_factory.mktemp("job"))


@pytest.mark.parametrize(("batch_norm", "training"), [("frozen", False), ("batch", True)])
def test_batch_norm_layers_normalise_as_the_variant_says(ctx, batch_norm, training):
    module = ctx.model.module
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert layers  # the tiny classifier is a ResNet
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.append(m.training)) for m in layers]
    running = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
    variant = Variant(optimizer="sgd", lr=0.05, steps=2, batch_size=8, batch_norm=batch_norm)
    try:
        tau = finetune_task_vector(ctx.model, ctx.forget_manifest, ctx.splits["forget"], variant)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {training}
    # The affine weights trained either way; the model is back as it was.
    assert any(bool(tau[k].abs().sum() > 0) for k in tau if k.endswith("bn1.weight"))
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in running.items())
    assert not module.training
