"""Versions stored as their parent plus a sparse XOR delta materialise to the dense bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from negmerge.io import file_sha256, open_checkpoint, save_file
from negmerge.sparse import SparseFile
from negmerge.version_delta import DenseReader, materialise, materialise_to, write_delta


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(100, 300, generator=g).to(torch.bfloat16),
        "fc.bias": torch.tensor([0.0, -0.0, float("nan"), 1.0]),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _unlearn(tensors: dict[str, torch.Tensor], seed: int, kept: float = 0.07) -> dict:
    """theta - lambda * tau with tau sparse, computed the way a job does (in float32)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        tau = torch.randn(value.shape, generator=g) * (torch.rand(value.shape, generator=g) < kept)
        out[key] = (value.float() - 0.7 * tau).to(value.dtype)
    return out


def _dense(path: Path, tensors: dict, seed: int) -> Path:
    save_file(tensors, path, {"negmerge.kind": "model", "seed": str(seed)})
    return path


def _delta(parent: Path, child: Path, out: Path, depth: int = 1) -> Path:
    written = write_delta(
        parent,
        child,
        out,
        parent_sha256=file_sha256(parent),
        child_sha256=file_sha256(child),
        depth=depth,
    )
    assert written
    return out


def _materialised(base: Path, deltas: list[Path], sha256: str) -> bytes:
    with open(base, "rb") as f:
        return b"".join(materialise(DenseReader(f), deltas, sha256))


def test_a_sparse_delta_round_trip_is_bit_exact_with_the_dense_file(tmp_path):
    parent = _dense(tmp_path / "v1.safetensors", _model(), 1)
    child = _dense(tmp_path / "v2.safetensors", _unlearn(_model(), 2), 2)
    delta = _delta(parent, child, tmp_path / "v2.delta.safetensors")
    assert _materialised(parent, [delta], file_sha256(child)) == child.read_bytes()
    assert delta.stat().st_size < child.stat().st_size / 2  # 7% kept
    target = tmp_path / "out" / "v2.safetensors"
    with open(parent, "rb") as f:
        materialise_to(DenseReader(f), [delta], file_sha256(child), target)
    assert target.read_bytes() == child.read_bytes()


def test_a_chain_of_five_versions_materialises_to_the_dense_files(tmp_path):
    tensors = _model()
    dense = [_dense(tmp_path / "v1.safetensors", tensors, 1)]
    deltas: list[Path] = []
    for n in range(2, 7):
        tensors = _unlearn(tensors, n)
        dense.append(_dense(tmp_path / f"v{n}.safetensors", tensors, n))
        deltas.append(_delta(dense[-2], dense[-1], tmp_path / f"v{n}.delta.safetensors", n - 1))
    for n in range(1, 6):
        got = _materialised(dense[0], deltas[:n], file_sha256(dense[n]))
        assert hashlib.sha256(got).hexdigest() == file_sha256(dense[n])


def _bits(elements: np.ndarray) -> np.ndarray:
    """The elements' bit patterns (as unsigned integers of their width)."""
    return elements.view(f"<u{elements.itemsize}")


def test_a_chain_of_five_materialises_to_the_five_deltas_applied_densely(tmp_path):
    # The other way round from streaming: every delta read whole as its dense XOR tensors
    # (negmerge.sparse) and applied to the base's tensors one after the other.
    tensors = _model()
    dense = [_dense(tmp_path / "v1.safetensors", tensors, 1)]
    deltas: list[Path] = []
    for n in range(2, 7):
        tensors = _unlearn(tensors, n)
        dense.append(_dense(tmp_path / f"v{n}.safetensors", tensors, n))
        deltas.append(_delta(dense[-2], dense[-1], tmp_path / f"v{n}.delta.safetensors", n - 1))
    with open_checkpoint(dense[0]) as base:
        applied = {key: _bits(base.read_array(key)).copy() for key in base.specs}
    for delta in deltas:
        with open_checkpoint(delta) as xor:
            assert isinstance(xor, SparseFile)
            for key, bits in applied.items():
                bits ^= _bits(xor.read_array(key))
    streamed = tmp_path / "streamed.safetensors"
    with open(dense[0], "rb") as f:
        materialise_to(DenseReader(f), deltas, file_sha256(dense[-1]), streamed)
    with open_checkpoint(streamed) as got, open_checkpoint(dense[-1]) as want:
        assert list(got.specs) == list(want.specs) == list(applied)
        for key, bits in applied.items():
            assert np.array_equal(_bits(got.read_array(key)), bits), key
            assert np.array_equal(_bits(want.read_array(key)), bits), key
    assert streamed.read_bytes() == dense[-1].read_bytes()


def test_a_wrong_base_fails_after_the_last_block(tmp_path):
    parent = _dense(tmp_path / "v1.safetensors", _model(), 1)
    child = _dense(tmp_path / "v2.safetensors", _unlearn(_model(), 2), 2)
    delta = _delta(parent, child, tmp_path / "v2.delta.safetensors")
    other = _dense(tmp_path / "other.safetensors", _model(seed=5), 1)
    with pytest.raises(Exception, match="hash to"):
        _materialised(other, [delta], file_sha256(child))


def test_a_file_with_other_tensors_is_not_stored_as_a_delta(tmp_path):
    parent = _dense(tmp_path / "v1.safetensors", _model(), 1)
    extra = {**_model(), "theta0.fc.bias": torch.zeros(4)}  # a linearized checkpoint's kind
    child = _dense(tmp_path / "lin.safetensors", extra, 2)
    out = tmp_path / "lin.delta.safetensors"
    assert not write_delta(parent, child, out, parent_sha256="p", child_sha256="c", depth=1)
    assert not out.exists()


def test_unchanged_elements_cost_only_their_mask_bit(tmp_path):
    parent = _dense(tmp_path / "v1.safetensors", _model(), 1)
    child = _dense(tmp_path / "v2.safetensors", _model(), 1)  # the same bytes
    delta = _delta(parent, child, tmp_path / "same.delta.safetensors")
    with open(delta, "rb") as f:
        specs = DenseReader(f).specs
    assert all(spec.numel == 0 for key, spec in specs.items() if key.startswith("values/"))
    assert np.array_equal(
        np.frombuffer(_materialised(parent, [delta], file_sha256(child)), np.uint8),
        np.frombuffer(child.read_bytes(), np.uint8),
    )
