from __future__ import annotations

import pytest
import torch
from torch import nn

from negmerge.errors import CheckpointError
from negmerge.io import load_state_dict, open_checkpoint, save_file
from negmerge.task_vector import (
    check_same_layout,
    subtract_task_vector,
    subtract_task_vector_file,
    task_vector,
)
from tests.negmerge.conftest import finetune_like, make_model_state


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def test_task_vector_covers_float_tensors_only():
    pre = make_model_state()
    ft = finetune_like(pre, 0)
    tau = task_vector(pre, ft)
    assert set(tau) == {"encoder.weight", "encoder.bias", "norm.running_mean", "head.weight"}
    assert torch.equal(tau["encoder.weight"], ft["encoder.weight"] - pre["encoder.weight"])
    assert tau["head.weight"].dtype == torch.float32


def test_applied_vector_loads_strictly_and_carries_integer_buffers_over():
    model = small_model()
    model.train()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 6))  # moves running stats and num_batches_tracked
    with torch.no_grad():
        model[0].weight.add_(0.5)
    tau = task_vector(pre, model.state_dict())
    unlearned = subtract_task_vector(pre, tau, 0.3)
    fresh = small_model()
    fresh.load_state_dict(unlearned, strict=True)
    assert torch.equal(unlearned["1.num_batches_tracked"], pre["1.num_batches_tracked"])
    expected = pre["0.weight"] - 0.3 * (model[0].weight.detach() - pre["0.weight"])
    assert torch.allclose(unlearned["0.weight"], expected, atol=1e-6)


def test_apply_in_place_writes_into_the_model_without_new_tensors():
    model = small_model()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    tau = {"0.weight": torch.ones(4, 6), "3.bias": torch.full((3,), 2.0)}
    weight_storage = model[0].weight.data_ptr()
    for scale in [0.0, 0.5, 1.0]:
        subtract_task_vector(pre, tau, scale, out=model.state_dict())
        assert model[0].weight.data_ptr() == weight_storage
        assert torch.allclose(model[0].weight, pre["0.weight"] - scale)
        assert torch.allclose(model[3].bias, pre["3.bias"] - 2 * scale)
        assert torch.equal(model[3].weight, pre["3.weight"])


def test_apply_rejects_keys_the_model_lacks():
    with pytest.raises(CheckpointError, match="'ghost' is not in the pretrained model"):
        subtract_task_vector({"w": torch.zeros(2)}, {"ghost": torch.zeros(2)}, 1.0)


def test_streamed_apply_equals_in_memory_apply(tmp_path):
    pre = make_model_state()
    tau = task_vector(pre, finetune_like(pre, 3))
    save_file(pre, tmp_path / "pre.safetensors")
    save_file(tau, tmp_path / "tau.safetensors")
    subtract_task_vector_file(
        tmp_path / "pre.safetensors",
        tmp_path / "tau.safetensors",
        0.7,
        tmp_path / "out.safetensors",
    )
    streamed = load_state_dict(tmp_path / "out.safetensors")
    in_memory = subtract_task_vector(pre, tau, 0.7)
    assert streamed.keys() == in_memory.keys()
    for key in in_memory:
        assert streamed[key].dtype == pre[key].dtype
        assert torch.equal(streamed[key], in_memory[key]), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("encoder.bias"), "key 'encoder.bias' is missing"),
        (
            lambda s: s.update({"encoder.bias": torch.zeros(30)}),
            r"'encoder.bias' is float32\[30\], but float32\[29\]",
        ),
        (lambda s: s.update({"encoder.bias": torch.zeros(29, dtype=torch.float64)}), "float64"),
        (lambda s: s.update({"extra": torch.zeros(1)}), "key 'extra' is not in pre.safetensors"),
    ],
)
def test_mismatched_checkpoints_name_the_first_offending_key(tmp_path, change, message):
    pre = make_model_state()
    other = finetune_like(pre, 0)
    change(other)
    save_file(pre, tmp_path / "pre.safetensors")
    save_file(other, tmp_path / "ft.safetensors")
    with (
        open_checkpoint(tmp_path / "pre.safetensors") as a,
        open_checkpoint(tmp_path / "ft.safetensors") as b,
        pytest.raises(CheckpointError, match=message),
    ):
        check_same_layout(a, b)
