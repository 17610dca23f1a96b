"""Linearized (tangent-space) models: the tangent model, its training, its checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from negmerge.context import JobContext
from negmerge.errors import NegMergeError
from negmerge.finetune import finetune_task_vector
from negmerge.fixtures import ensure_tiny_classifier
from negmerge.fixtures.jobs import forget_class_job
from negmerge.io import load_state_dict, open_checkpoint, save_file
from negmerge.job_spec import JobSpec
from negmerge.linearize import (
    DELTA_PREFIX,
    apply_tangent_file,
    checkpoint_finetuning,
    linearize,
    linearized_metadata,
)
from negmerge.models import ModelSpec, load_linearized, load_model
from negmerge.pipeline import run_unlearning
from negmerge.variants import Variant


def tiny_network() -> nn.Module:
    """Conv, BatchNorm (with running statistics that are not the identity) and a smooth
    nonlinearity, in float64 so that finite differences are accurate."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.Tanh(),
    ).double()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def direction(module: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for name, p in module.named_parameters()
    }


def moved(module: nn.Module, step: dict[str, torch.Tensor], t: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(step[name], alpha=t)


def test_the_tangent_model_agrees_with_a_finite_difference_of_the_network():
    net = tiny_network()
    plain = copy.deepcopy(net)
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    d = direction(net)
    f0 = plain(x)

    # The directional derivative of f at theta0 along d, by central differences.
    h = 1e-5
    ahead, behind = copy.deepcopy(plain), copy.deepcopy(plain)
    moved(ahead, d, h)
    moved(behind, d, -h)
    derivative = (ahead(x) - behind(x)) / (2 * h)

    linearize(net)
    net.train()  # the function is evaluated in eval mode whatever the module's mode
    assert torch.allclose(net(x), f0, atol=1e-12)  # at theta0: f itself
    eps = 1e-2
    moved(net, d, eps)
    first = net(x) - f0
    assert torch.allclose(first, eps * derivative, rtol=1e-6, atol=1e-9)
    # Linear in theta - theta0 exactly, where the network is not.
    moved(net, d, 2 * eps)
    assert torch.allclose(net(x) - f0, 3 * first, atol=1e-10)
    far = copy.deepcopy(plain)
    moved(far, d, 3 * eps)
    assert (far(x) - f0 - 3 * first).abs().max() > 1e-4


def test_its_gradient_is_the_networks_at_theta0_wherever_theta_is():
    net = tiny_network()
    plain = copy.deepcopy(net)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    v = torch.randn(5, 5, dtype=torch.float64)
    (plain(x) * v).sum().backward()
    expected = {name: p.grad.clone() for name, p in plain.named_parameters()}

    keys = list(net.state_dict())
    linearize(net)
    assert list(net.state_dict()) == keys  # theta stays in the module's own parameters
    moved(net, direction(net), 0.3)  # the tangent's gradient is J^T v, the same anywhere
    (net(x) * v).sum().backward()
    for name, p in net.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-10), name


@pytest.fixture(scope="module")
def classifier():
    return ensure_tiny_classifier()


def classifier_spec(classifier, **changes) -> ModelSpec:
    return ModelSpec(**{**forget_class_job(classifier)["model"], **changes})


def images(spec: ModelSpec, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, spec.image_size, spec.image_size, generator=torch.Generator())


def test_linearized_fine_tuning_trains_the_tangent_model_and_restores_theta0(classifier):
    spec = classifier_spec(classifier)
    model = load_model(spec, finetuning="linear")
    x = images(spec)
    with torch.no_grad():
        before = model.module(x)
    samples = [s for s in _manifest(classifier).samples if s.split == "train"][:64]
    variant = Variant(optimizer="sgd", lr=0.05, weight_decay=0.0, steps=3, batch_size=16)
    tau = finetune_task_vector(model, _manifest(classifier), samples, variant)
    assert set(tau) == set(model.tau_keys)
    assert sum(float(t.abs().sum()) for t in tau.values()) > 0
    with torch.no_grad():
        assert torch.equal(model.module(x), before)  # theta is theta0 again

    # Moving theta by tau moves the output by exactly J tau: twice tau, twice the change.
    state = model.module.state_dict()
    with torch.no_grad():
        for key, t in tau.items():
            state[key].add_(t)
        once = model.module(x) - before
        for key, t in tau.items():
            state[key].add_(t)
        twice = model.module(x) - before
    assert torch.allclose(twice, 2 * once, rtol=1e-3, atol=1e-4)
    assert once.abs().max() > 1e-3


def _manifest(classifier):
    from negmerge.data import Manifest

    return Manifest.load(str(classifier.dataset_root))


def test_the_linearized_checkpoint_loads_back_as_the_tangent_model(classifier, tmp_path):
    spec = classifier_spec(classifier)
    model = load_model(spec, finetuning="linear")
    step = direction(model.module)
    moved(model.module, {k: 0.01 * v.float() for k, v in step.items()}, 1.0)
    x = images(spec)
    with torch.no_grad():
        expected = model.module.eval()(x)
    path = tmp_path / "linear.safetensors"
    save_file(model.full_state(), path, linearized_metadata(model.linearized_part))

    # theta0 is stored bit for bit as the registered weights, beside the fp32 delta.
    stored, original = load_state_dict(path), load_state_dict(spec.weights)
    for key, value in original.items():
        assert torch.equal(stored[key], value), key
    assert set(k for k in stored if k.startswith(DELTA_PREFIX)) == {
        DELTA_PREFIX + k for k in model.tau_keys
    }
    assert checkpoint_finetuning(str(path)) == "linear"

    served = load_linearized(spec.model_copy(update={"weights": str(path)}))
    with torch.no_grad():
        assert torch.allclose(served(x), expected, atol=1e-5)
        # Not the plain network at theta0 + delta: the tangent model.
        plain = load_model(spec).module
        for name, p in plain.named_parameters():
            p.add_(0.01 * step[name].float())
        assert not torch.allclose(plain(x), expected, atol=1e-5)

    with pytest.raises(NegMergeError, match="linearized checkpoint.*load_linearized"):
        load_model(spec.model_copy(update={"weights": str(path)}))
    with pytest.raises(NegMergeError, match="standard checkpoint"):
        load_linearized(spec)


def test_applying_a_task_vector_moves_only_the_delta(classifier, tmp_path):
    spec = classifier_spec(classifier)
    model = load_model(spec, finetuning="linear")
    moved(model.module, {k: 0.01 * v.float() for k, v in direction(model.module).items()}, 1.0)
    base = tmp_path / "base.safetensors"
    save_file(model.full_state(), base, linearized_metadata(""))
    tau = {k: v.float() * 0.1 for k, v in direction(model.module, seed=2).items()}
    save_file(tau, tmp_path / "tau.safetensors")
    output = tmp_path / "out.safetensors"
    metadata = apply_tangent_file(base, tmp_path / "tau.safetensors", 2.0, output, "")
    assert metadata["finetuning"] == "linear"
    before, after = load_state_dict(base), load_state_dict(output)
    for key, value in before.items():
        if key.startswith(DELTA_PREFIX):
            expected = value - 2.0 * tau[key[len(DELTA_PREFIX) :]]
            assert torch.allclose(after[key], expected, atol=1e-6), key
        else:
            assert torch.equal(after[key], value), key
    with open_checkpoint(output) as checkpoint:
        assert checkpoint.metadata["format"] == "negmerge.model"


TWO_SHORT_VARIANTS = {
    "preset": "tiny-classifier",
    "base": {"epochs": 2},
    "grid": {"augment": ["rand-m9-n2", "rand-m9-n3"]},
}


def test_a_linear_job_searches_and_measures_the_tangent_model_it_stores(classifier, tmp_path):
    job = {
        **forget_class_job(classifier),
        "variants": {
            "preset": "tiny-classifier",
            "grid": {"augment": ["rand-m9-n2", "rand-m9-n3"]},
        },
        "max_eval_samples": 64,
        "finetuning": "linear",
    }
    spec = JobSpec.model_validate(job)
    report = run_unlearning(spec, tmp_path / "job")
    assert report.finetuning == "linear" and report.lambda_ > 0
    before, after = report.metrics.before, report.metrics.after
    assert after["forget_acc"] < before["forget_acc"]
    stored = report.model.path
    assert checkpoint_finetuning(stored) == "linear"

    # The metrics are the served tangent model's: its accuracy on the forget split is the
    # report's (the split's images as the job drew them).
    ctx = JobContext.load(spec, tmp_path / "job")
    served = load_linearized(spec.model.model_copy(update={"weights": stored}))
    data = ctx.eval_set("forget")
    with torch.no_grad():
        predicted = served(data.images).argmax(dim=1)
    assert 100 * float((predicted == data.labels).float().mean()) == pytest.approx(
        after["forget_acc"], abs=100 / len(data) + 1e-9
    )
    # and not the plain network's at the same weights (theta0 + delta), which a standard
    # apply of the task vector would have made.
    plain = load_model(spec.model).module
    state = load_state_dict(stored)
    with torch.no_grad():
        for key, p in plain.named_parameters():
            p.add_(state[DELTA_PREFIX + key])
        assert not torch.allclose(plain(data.images), served(data.images), atol=1e-4)


class TinyAttention(nn.Module):
    """Attention as open_clip's ViTs use it (nn.MultiheadAttention), whose fused inference
    kernel has no forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(mixed.mean(dim=1))


def test_attention_models_linearize_in_inference_and_in_training():
    torch.manual_seed(0)
    net = TinyAttention().eval()
    tokens = torch.randn(4, 5, 8)
    with torch.no_grad():
        expected = net(tokens)
    linearize(net)
    with torch.no_grad():  # the frozen copy would take the fused path here
        assert torch.allclose(net(tokens), expected, atol=1e-6)
    net.train()
    net(tokens).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_clip_linearizes_its_image_tower_and_loads_back(tmp_path):
    from negmerge.fixtures import ensure_tiny_clip
    from negmerge.fixtures.jobs import forget_domain_job

    spec = ModelSpec(**forget_domain_job(ensure_tiny_clip())["model"])
    model = load_model(spec, finetuning="linear")
    assert model.linearized_part == "visual"
    assert all(key.startswith("visual.") for key in model.tau_keys)
    moved(model.module, {k: 0.01 * v for k, v in direction(model.module).items()}, 1.0)
    size = model.module.visual.image_size
    size = size if isinstance(size, int) else size[0]
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model.module.eval()(x)
    path = tmp_path / "clip-linear.safetensors"
    save_file(model.full_state(), path, linearized_metadata(model.linearized_part))
    stored = load_state_dict(path)
    deltas = [k for k in stored if k.startswith(DELTA_PREFIX)]
    assert deltas and all(k.startswith(DELTA_PREFIX + "visual.") for k in deltas)
    assert any(k.startswith("transformer.") for k in stored)  # the text tower, as it was
    served = load_linearized(spec.model_copy(update={"weights": str(path)}))
    with torch.no_grad():
        assert torch.allclose(served(x), expected, atol=1e-5)
