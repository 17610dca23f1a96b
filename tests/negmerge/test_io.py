from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

from negmerge.errors import CheckpointError
from negmerge.io import (
    SafetensorsWriter,
    TensorSpec,
    file_sha256,
    load_state_dict,
    open_checkpoint,
    save_file,
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
