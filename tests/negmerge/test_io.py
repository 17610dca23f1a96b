from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch

from negmerge.errors import CheckpointError
from negmerge.io import (
    SafetensorsWriter,
    TensorSpec,
    file_sha256,
    load_arrays,
    load_state_dict,
    open_checkpoint,
    save_file,
    to_float32,
)
from tests.negmerge.conftest import make_model_state


def test_our_files_and_the_safetensors_library_read_each_other(tmp_path):
    state = make_model_state()
    save_file(state, tmp_path / "ours.safetensors", {"note": "hello"})
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert theirs.keys() == state.keys()
    assert all(torch.equal(theirs[k], state[k]) for k in state)

    safetensors.torch.save_file(state, tmp_path / "lib.safetensors", {"note": "hi"})
    with open_checkpoint(tmp_path / "lib.safetensors") as ckpt:
        assert ckpt.metadata == {"note": "hi"}
        assert all(torch.equal(ckpt.tensor(k), state[k]) for k in state)
        assert ckpt.specs["head.weight"] == TensorSpec(torch.bfloat16, (11, 29))


def test_slices_read_into_a_caller_buffer_without_allocating(tmp_path):
    tensor = torch.arange(1000, dtype=torch.float32)
    save_file({"t": tensor}, tmp_path / "a.safetensors")
    buffer = torch.empty(4000, dtype=torch.uint8)
    with open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        piece = ckpt.read("t", 100, 350, buffer=buffer)
        assert piece.data_ptr() == buffer.data_ptr()
        assert torch.equal(piece, tensor[100:350])
        with pytest.raises(IndexError):
            ckpt.read("t", 900, 1001)


@pytest.mark.parametrize("order", ["forward", "backward", "partial", "none"])
def test_sha256_is_the_file_hash_whatever_was_read(tmp_path, order):
    state = make_model_state()
    save_file(state, tmp_path / "m.safetensors")
    expected = hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        keys = list(ckpt.specs)
        reads = {"forward": keys, "backward": keys[::-1], "partial": keys[1:2], "none": []}[order]
        for key in reads:
            ckpt.read(key)
        assert ckpt.sha256() == expected == file_sha256(tmp_path / "m.safetensors")


def test_writer_is_atomic_and_leaves_nothing_on_error(tmp_path):
    specs = {"a": TensorSpec(torch.float32, (4,)), "b": TensorSpec(torch.float32, (2,))}
    with pytest.raises(RuntimeError), SafetensorsWriter(tmp_path / "out.safetensors", specs) as w:
        w.write("a", torch.ones(4))
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    writer = SafetensorsWriter(tmp_path / "out.safetensors", specs)
    writer.write("a", torch.ones(4))
    with pytest.raises(ValueError, match="closed with 8 bytes unwritten"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_out_of_order_and_oversized_writes(tmp_path):
    specs = {"a": TensorSpec(torch.float32, (4,)), "b": TensorSpec(torch.float32, (2,))}
    with SafetensorsWriter(tmp_path / "o.safetensors", specs) as writer:
        with pytest.raises(ValueError, match="out of order"):
            writer.write("b", torch.ones(2))
        writer.write("a", torch.ones(3))
        with pytest.raises(ValueError, match="8 bytes written where 4 remain"):
            writer.write("a", torch.ones(2))
        writer.write("a", torch.ones(1))
        writer.write("b", torch.zeros(2))
        writer.metadata["late"] = json.dumps(["set after the data"])
    with open_checkpoint(tmp_path / "o.safetensors") as ckpt:
        assert json.loads(ckpt.metadata["late"]) == ["set after the data"]
        assert ckpt.tensor("a").tolist() == [1.0] * 4


def test_pytorch_state_dicts_load_with_weights_only(tmp_path):
    state = make_model_state()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pt")
    for name in ["plain.pt", "nested.pt"]:
        loaded = load_state_dict(tmp_path / name)
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickled_modules_are_refused(tmp_path):
    torch.save(torch.nn.Linear(3, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"module.pt: refused to load: .*pickled"):
        open_checkpoint(tmp_path / "module.pt")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\x05\x00\x00\x00\x00\x00\x00\x00hello", "not a safetensors or PyTorch"),
        (b"\xff" * 16, "not a safetensors or PyTorch"),
    ],
)
def test_files_that_are_not_checkpoints_are_named(tmp_path, content, message):
    (tmp_path / "junk.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "junk.bin")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    + [torch.float8_e4m3fn, torch.float8_e5m2],
)
def test_views_convert_to_float32_exactly_as_torch_does(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(3000, generator=gen) * 40).to(dtype)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # every bit pattern, NaNs included
        values = torch.arange(256, dtype=torch.uint8).view(dtype)
    save_file({"t": values}, tmp_path / "a.safetensors")
    with open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        spec = ckpt.specs["t"]
        raw = ckpt.view("t", 5, len(values))
        out = to_float32(raw, spec.dtype, np.empty(len(raw), np.float32))
        expected = values[5:].float().numpy()
        assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
        assert not raw.flags.writeable  # a view of the file, never written through
        del raw, out
        ckpt.release("t", 5, len(values))


def test_numpy_arrays_round_trip_without_torch(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array([7], np.int64)}
    save_file(arrays, tmp_path / "a.safetensors", {"k": "v"})
    loaded = load_arrays(tmp_path / "a.safetensors")
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    assert loaded["w"].dtype == np.float32 and loaded["n"].dtype == np.int64
    with open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        assert ckpt.specs["w"] == TensorSpec("F32", (3, 4)) == TensorSpec(np.float32, (3, 4))


def test_the_merge_engine_imports_without_torch():
    """`negmerge merge` needs no torch: importing it alone costs more than a checkpoint."""
    code = (
        "import sys, negmerge.io, negmerge.merge.streaming, negmerge.merge.partial; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
