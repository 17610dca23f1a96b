"""Sparse checkpoint files: bit-exact round trips, streaming reads, and merges and applies that
give the same bytes as the dense file."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
import safetensors.torch
import torch

from negmerge.errors import CheckpointError
from negmerge.io import (
    SafetensorsFile,
    TensorSpec,
    file_sha256,
    load_state_dict,
    open_checkpoint,
    save_file,
)
from negmerge.merge.streaming import merge_files
from negmerge.sparse import (
    BLOCK_ELEMENTS,
    SPARSE_LAYOUT,
    SparseFile,
    SparseTensors,
    SparseWriter,
    convert,
    mask_nbytes,
)
from negmerge.task_vector import load_task_vector, subtract_task_vector, subtract_task_vector_file
from tests.negmerge.conftest import finetune_like, make_model_state


def sparse_like(shape: tuple[int, ...], kept: float, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen)
    dropped = torch.rand(shape, generator=gen) >= kept
    return values.masked_fill(dropped, 0.0).to(dtype)  # +0.0: a product could give -0.0


def edge_cases() -> dict[str, torch.Tensor]:
    """Every kind of tensor a task vector or a model may hold, with the awkward values."""
    special = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, 0.0, -0.0]
    )
    return {
        "specials.f32": special,
        "specials.f16": special.half(),
        "specials.bf16": special.bfloat16(),
        "sparse.f32": sparse_like((3 * BLOCK_ELEMENTS + 77,), 0.06, 1),  # spans blocks
        "sparse.bf16": sparse_like((129, 65), 0.1, 2, torch.bfloat16),
        "sparse.f16": sparse_like((1001,), 0.5, 3, torch.float16),
        "zeros": torch.zeros(17, 3),
        "all_kept": torch.randn(BLOCK_ELEMENTS + 5, generator=torch.Generator().manual_seed(4)),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "num_batches_tracked": torch.tensor(7),
        "int32": torch.tensor([0, -1, 0, 5], dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
    }


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
        assert raw(actual[key]) == raw(tensor), key


def test_round_trip_is_bit_exact_for_every_dtype_and_edge_case(tmp_path):
    tensors = edge_cases()
    save_file(tensors, tmp_path / "dense.safetensors", {"format": "negmerge.task_vector"})
    convert(tmp_path / "dense.safetensors", tmp_path / "sparse.safetensors")

    with open_checkpoint(tmp_path / "sparse.safetensors") as ckpt:
        assert isinstance(ckpt, SparseFile)
        assert ckpt.metadata == {"format": "negmerge.task_vector", "layout": SPARSE_LAYOUT}
        assert ckpt.specs == {k: TensorSpec(t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        # -0.0 and NaN are kept (their bits are not zero); only +0.0 is dropped
        assert ckpt.kept("specials.f32") == 8
        assert ckpt.kept("zeros") == 0 and ckpt.kept("all_kept") == BLOCK_ELEMENTS + 5
    assert_bit_exact(load_state_dict(tmp_path / "sparse.safetensors"), tensors)
    assert_bit_exact(dict(SparseTensors(tmp_path / "sparse.safetensors")), tensors)

    convert(tmp_path / "sparse.safetensors", tmp_path / "back.safetensors", sparse=False)
    with open_checkpoint(tmp_path / "back.safetensors") as ckpt:
        assert isinstance(ckpt, SafetensorsFile)
        assert ckpt.metadata == {"format": "negmerge.task_vector"}
    assert_bit_exact(load_state_dict(tmp_path / "back.safetensors"), tensors)


def test_a_sparse_file_is_plain_safetensors_to_other_readers(tmp_path):
    tensors = edge_cases()
    save_file(tensors, tmp_path / "dense.safetensors")
    convert(tmp_path / "dense.safetensors", tmp_path / "sparse.safetensors")
    stored = safetensors.torch.load_file(tmp_path / "sparse.safetensors")
    for key, tensor in tensors.items():
        mask, values = stored[f"mask/{key}"].numpy(), stored[f"values/{key}"]
        assert values.dtype == tensor.dtype
        assert mask.shape == (mask_nbytes(tensor.numel()),)
        bits = np.unpackbits(mask, bitorder="little")
        assert int(bits.sum()) == len(values)
        assert not bits[tensor.numel() :].any()  # padding


def test_slices_anywhere_equal_the_dense_slices(tmp_path):
    tensors = {"t": sparse_like((5 * BLOCK_ELEMENTS + 3,), 0.07, 5)}
    dense = tensors["t"].numpy()
    save_file(tensors, tmp_path / "dense.safetensors")
    convert(tmp_path / "dense.safetensors", tmp_path / "sparse.safetensors")
    bounds = [(0, 0), (0, 1), (7, 9), (BLOCK_ELEMENTS - 3, BLOCK_ELEMENTS + 3)]
    bounds += [(2 * BLOCK_ELEMENTS, 2 * BLOCK_ELEMENTS), (12345, len(dense)), (0, len(dense))]
    buffer = np.empty(len(dense) * 4, np.uint8)
    with open_checkpoint(tmp_path / "sparse.safetensors") as ckpt:
        for start, stop in reversed(bounds):  # out of order too
            assert np.array_equal(ckpt.read_array("t", start, stop), dense[start:stop])
            piece = ckpt.read_array("t", start, stop, buffer=buffer.copy())
            assert np.array_equal(piece, dense[start:stop])
        with pytest.raises(IndexError):
            ckpt.read_array("t", 0, len(dense) + 1)
        assert ckpt.sha256() == file_sha256(tmp_path / "sparse.safetensors")


def test_writer_takes_slices_that_split_bytes_and_refuses_bad_order(tmp_path):
    tensors = edge_cases()
    specs = {k: TensorSpec(t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    with SparseWriter(tmp_path / "s.safetensors", specs, {"note": "x"}) as writer:
        for key, tensor in tensors.items():
            flat = tensor.reshape(-1)
            for start in range(0, flat.numel(), 13):  # 13: mask bits cross byte boundaries
                writer.write(key, flat[start : start + 13])
        writer.metadata["late"] = "set before close"
    with open_checkpoint(tmp_path / "s.safetensors") as ckpt:
        assert ckpt.metadata["late"] == "set before close"
    assert_bit_exact(load_state_dict(tmp_path / "s.safetensors"), tensors)

    writer = SparseWriter(tmp_path / "bad.safetensors", specs)
    with pytest.raises(ValueError, match="out of order"):
        writer.write("sparse.f32", tensors["sparse.f32"])
    with pytest.raises(ValueError, match="unfinished"):
        writer.close()
    assert not list(tmp_path.glob("*bad*"))


def corrupt_header(path, change) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    text = json.dumps(header).encode().ljust(length)
    assert len(text) == length
    path.write_bytes(data[:8] + text + data[8 + length :])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h["__metadata__"].update(layout_tensors="[1]"), "invalid tensor list"),
        (lambda h: h["__metadata__"].update(layout_tensors='[["t", "F64", [100]]]'), "'t'"),
        (lambda h: h["mask/t"].update(dtype="I8"), "invalid sparse entry"),
    ],
)
def test_a_damaged_sparse_file_is_refused(tmp_path, change, message):
    save_file({"t": sparse_like((100,), 0.3, 6)}, tmp_path / "d.safetensors")
    convert(tmp_path / "d.safetensors", tmp_path / "s.safetensors")
    corrupt_header(tmp_path / "s.safetensors", change)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "s.safetensors")


def test_a_mask_that_disagrees_with_the_values_is_refused(tmp_path):
    save_file({"t": sparse_like((100,), 0.3, 6)}, tmp_path / "d.safetensors")
    convert(tmp_path / "d.safetensors", tmp_path / "s.safetensors")
    with open_checkpoint(tmp_path / "s.safetensors") as ckpt:
        begin = ckpt.stored._offsets["mask/t"]
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[begin] ^= 0xFF
    (tmp_path / "s.safetensors").write_bytes(bytes(data))
    with (
        open_checkpoint(tmp_path / "s.safetensors") as ckpt,
        pytest.raises(CheckpointError, match="mask and values disagree"),
    ):
        ckpt.read_array("t")


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """0x80 opens a pickle too; the header's "{" tells them apart (one file in 32 has it)."""
    for note in range(64):
        save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors", {"note": "x" * note})
        if (tmp_path / "m.safetensors").read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 was made")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        assert isinstance(ckpt, SafetensorsFile)
        assert ckpt.metadata == {"note": "x" * note}


# ---- the merge writes it, apply and the library read it ----------------------------------


@pytest.fixture
def merged_pair(tmp_path):
    """One negmerge merge written sparse and dense (a pretrained base with an integer buffer
    and a bf16 tensor, five fine-tuned runs that mostly disagree in sign)."""
    pre = make_model_state()
    save_file(pre, tmp_path / "pre.safetensors")
    paths = []
    for k in range(5):
        paths.append(tmp_path / f"ft{k}.safetensors")
        save_file(finetune_like(pre, k), paths[-1])
    results = {
        layout: merge_files(
            "negmerge",
            paths,
            tmp_path / f"{layout}.safetensors",
            tmp_path / "pre.safetensors",
            layout=layout,
            chunk_elements=100,
        )
        for layout in ("sparse", "dense")
    }
    return tmp_path, pre, results


def test_the_merge_writes_the_same_vector_sparse_and_dense(merged_pair):
    folder, _, results = merged_pair
    sparse, dense = results["sparse"], results["dense"]
    assert sparse.layout == "sparse" and dense.layout == "dense"
    assert 0 < sparse.kept_fraction < 0.2
    assert sparse.output_bytes == (folder / "sparse.safetensors").stat().st_size
    assert dense.output_bytes == (folder / "dense.safetensors").stat().st_size
    assert sparse.dense_bytes == dense.dense_bytes
    assert sparse.output_bytes < sparse.dense_bytes < dense.output_bytes
    assert_bit_exact(
        load_state_dict(folder / "sparse.safetensors"),
        load_state_dict(folder / "dense.safetensors"),
    )
    with (
        open_checkpoint(folder / "sparse.safetensors") as s,
        open_checkpoint(folder / "dense.safetensors") as d,
    ):
        assert s.metadata == {**d.metadata, "layout": SPARSE_LAYOUT}


def test_auto_writes_dense_when_sparse_would_be_larger(tmp_path):
    pre = make_model_state()
    save_file(pre, tmp_path / "pre.safetensors")
    save_file(finetune_like(pre, 0), tmp_path / "ft.safetensors")
    kept_all = merge_files(  # one run: every element kept; a mask would only add to it
        "negmerge",
        [tmp_path / "ft.safetensors"],
        tmp_path / "a.safetensors",
        tmp_path / "pre.safetensors",
    )
    assert kept_all.layout == "dense"
    with open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        assert isinstance(ckpt, SafetensorsFile) and "layout" not in ckpt.metadata
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def data_bytes(path) -> bytes:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return blob[8 + length :]


def test_apply_from_sparse_equals_apply_from_dense_byte_for_byte(merged_pair):
    folder, pre, _ = merged_pair
    outputs = {}
    for layout in ("sparse", "dense"):
        outputs[layout] = folder / f"model-{layout}.safetensors"
        subtract_task_vector_file(
            folder / "pre.safetensors", folder / f"{layout}.safetensors", 0.7, outputs[layout]
        )
    assert data_bytes(outputs["sparse"]) == data_bytes(outputs["dense"])
    with open_checkpoint(outputs["sparse"]) as s, open_checkpoint(outputs["dense"]) as d:
        assert s.specs == d.specs
        sources = {k: json.loads(c.metadata.pop("sources")) for k, c in (("s", s), ("d", d))}
        assert s.metadata == d.metadata
        assert sources["s"]["vector_sha256"] == file_sha256(folder / "sparse.safetensors")

    # in memory too: the search's path, the vector held sparse
    vector = load_task_vector(folder / "sparse.safetensors")
    assert isinstance(vector, SparseTensors)
    reference = subtract_task_vector(pre, load_task_vector(folder / "dense.safetensors"), 0.7)
    assert_bit_exact(subtract_task_vector(pre, vector, 0.7), reference)
    assert_bit_exact(reference, load_state_dict(outputs["dense"]))


# ---- memory: one tensor at a time -----------------------------------------------------------


def test_reading_a_sparse_file_holds_one_slice_or_one_tensor_at_a_time(tmp_path):
    """numpy's allocations are traced: streaming slices of a sparse file peaks at about one
    slice, and a held-sparse vector at its sparse data plus one dense tensor."""
    tensors = {f"layer{i}": sparse_like((1 << 20,), 0.06, 10 + i) for i in range(8)}
    save_file(tensors, tmp_path / "d.safetensors")
    convert(tmp_path / "d.safetensors", tmp_path / "s.safetensors")
    tensor_bytes = (1 << 20) * 4
    slice_elements = 1 << 16
    with open_checkpoint(tmp_path / "s.safetensors", hashing=False) as ckpt:
        tracemalloc.start()
        try:
            for key, spec in ckpt.specs.items():
                for start in range(0, spec.numel, slice_elements):
                    ckpt.read_array(key, start, start + slice_elements)
            _, streamed_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert streamed_peak < tensor_bytes / 4  # a slice is 256 KiB, a tensor 4 MiB

    tracemalloc.start()
    try:
        vector = SparseTensors(tmp_path / "s.safetensors")
        held = vector.nbytes
        for key in vector:  # compared as bits, in torch (not traced)
            assert torch.equal(vector[key].view(torch.int32), tensors[key].view(torch.int32))
        _, held_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 8 * tensor_bytes / 4
    assert held_peak < held + 2 * tensor_bytes  # all eight dense would be 8 tensors


def test_sparse_task_vector_files_merge_like_their_dense_copies(merged_pair, tmp_path):
    """Task-vector inputs (no --pretrained) may be sparse: the engine reads them as dense."""
    folder, _, _ = merged_pair
    taus = {}
    for k in range(3):
        ft = load_state_dict(folder / f"ft{k}.safetensors")
        pre = load_state_dict(folder / "pre.safetensors")
        tau = {
            key: (ft[key].float() - v.float()) for key, v in pre.items() if v.is_floating_point()
        }
        tau = {key: t.masked_fill(t.abs() < 0.05, 0.0) for key, t in tau.items()}
        save_file(tau, tmp_path / f"tau{k}.safetensors")
        convert(tmp_path / f"tau{k}.safetensors", tmp_path / f"tau{k}.sparse.safetensors")
        taus[k] = tau
    for kind in ("", ".sparse"):
        merge_files(
            "ties",
            [tmp_path / f"tau{k}{kind}.safetensors" for k in range(3)],
            tmp_path / f"merged{kind}.safetensors",
            chunk_elements=64,
        )
    assert_bit_exact(
        load_state_dict(tmp_path / "merged.sparse.safetensors"),
        load_state_dict(tmp_path / "merged.safetensors"),
    )
