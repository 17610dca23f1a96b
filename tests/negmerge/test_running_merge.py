"""The running merge state: task vectors folded as they come equal the merge of stored ones."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from negmerge.errors import MergeError
from negmerge.io import load_arrays, save_file
from negmerge.merge.partial import PartialMerge
from negmerge.merge.running import (
    combine_states,
    fold_task_vector,
    supports_running,
    write_merged,
)
from negmerge.merge.streaming import merge_files
from negmerge.task_vector import load_task_vector

SHAPES = {"a.weight": (7, 5), "b.bias": (11,)}


def task_vectors(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    # A shared direction plus noise: some elements agree in sign across all n, most do not.
    return [
        {k: shared[k] + 0.6 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        for _ in range(n)
    ]


def plain_negmerge(vectors: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The paper's rule written out: the mean where all n agree in sign, 0 elsewhere."""
    merged = {}
    for key in SHAPES:
        stacked = np.stack([v[key].numpy() for v in vectors]).astype(np.float64)
        agree = (stacked > 0).all(axis=0) | (stacked < 0).all(axis=0)
        merged[key] = np.where(agree, stacked.mean(axis=0), 0.0)
    return merged


def write_taus(folder, vectors) -> list[str]:
    paths = []
    for k, vector in enumerate(vectors):
        path = folder / f"tau{k}.safetensors"
        save_file(vector, path)
        paths.append(str(path))
    return paths


def fold_all(folder, paths, order, method="negmerge", params=None, name="w") -> str:
    """One worker folding the variants of `order`, each fold into a new file."""
    state = None
    for step, index in enumerate(order):
        out = folder / f"{name}-{step}.safetensors"
        fold_task_vector(method, params, paths[index], index, state, out)
        state = out
    return str(state)


def test_folded_states_equal_the_plain_rule_and_the_stored_task_vectors_merge(tmp_path):
    vectors = task_vectors(10)
    paths = write_taus(tmp_path, vectors)
    # Three workers, variants finishing in an arbitrary order.
    states = [
        fold_all(tmp_path, paths, [7, 0, 3], name="w1"),
        fold_all(tmp_path, paths, [9, 1, 5, 2], name="w2"),
        fold_all(tmp_path, paths, [4, 8, 6], name="w3"),
    ]
    combined = combine_states(states)
    assert sorted(combined.variants) == list(range(10)) and combined.n == 10
    write_merged(combined, tmp_path / "running.safetensors")
    merge_files("negmerge", paths, tmp_path / "stored.safetensors")
    running = load_task_vector(tmp_path / "running.safetensors")
    stored = load_task_vector(tmp_path / "stored.safetensors")
    expected = plain_negmerge(vectors)
    for key in SHAPES:
        assert 0 < np.count_nonzero(expected[key]) < expected[key].size  # both cases occur
        np.testing.assert_allclose(running[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(running[key].numpy(), stored[key].numpy(), rtol=1e-6, atol=1e-7)
        # The kept elements are exactly the same ones.
        assert ((running[key] != 0) == (stored[key] != 0)).all()


def test_two_workers_states_combined_equal_one_workers_state(tmp_path):
    paths = write_taus(tmp_path, task_vectors(6, seed=1))
    one = PartialMerge.load(fold_all(tmp_path, paths, range(6), name="one"))
    two = combine_states(
        [
            fold_all(tmp_path, paths, [5, 3, 1], name="odd"),
            fold_all(tmp_path, paths, [4, 0, 2], name="even"),
        ]
    )
    # Partitioned otherwise, combined in the other order.
    reversed_ = combine_states(
        [
            fold_all(tmp_path, paths, [3, 4, 5], name="second"),
            fold_all(tmp_path, paths, [0, 1, 2], name="first"),
        ]
    )
    for key in SHAPES:
        for other in (two, reversed_):
            np.testing.assert_allclose(
                one.finish(numpy=True)[key], other.finish(numpy=True)[key], rtol=1e-6, atol=1e-7
            )
        for name, value in one.states[key].items():
            exact = name != "sum"  # the sum differs in fp32 rounding only
            tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-6}
            np.testing.assert_allclose(value, two.states[key][name], **tolerance)


def test_a_negmerge_state_is_stored_in_about_one_point_06_times_the_model(tmp_path):
    big = {"w": torch.randn(256, 1024)}
    save_file(big, tmp_path / "tau.safetensors")
    fold_task_vector("negmerge", None, tmp_path / "tau.safetensors", 0, None, tmp_path / "s")
    model_bytes = 256 * 1024 * 4
    assert os.path.getsize(tmp_path / "s") <= 1.07 * model_bytes
    stored = load_arrays(tmp_path / "s")
    assert set(stored) == {"w::sum", "w::all_positive", "w::all_negative"}


@pytest.mark.parametrize(
    ("method", "params"), [("uniform", None), ("negmerge", {"consensus": 0.7})]
)
def test_other_commutative_methods_fold_to_their_stored_merge(tmp_path, method, params):
    paths = write_taus(tmp_path, task_vectors(5, seed=2))
    combined = combine_states(
        [
            fold_all(tmp_path, paths, [4, 1], method, params, "a"),
            fold_all(tmp_path, paths, [0, 3, 2], method, params, "b"),
        ]
    )
    write_merged(combined, tmp_path / "running.safetensors")
    merge_files(method, paths, tmp_path / "stored.safetensors", params=params)
    running = load_task_vector(tmp_path / "running.safetensors")
    stored = load_task_vector(tmp_path / "stored.safetensors")
    for key in SHAPES:
        np.testing.assert_allclose(running[key].numpy(), stored[key].numpy(), rtol=1e-6, atol=1e-7)


def test_which_methods_keep_a_running_state():
    assert supports_running("negmerge") and supports_running("uniform")
    # MagMax's tie rule (the later one wins) and TIES' whole-model trim depend on the order
    # and on every task vector: they keep stored task vectors.
    assert not supports_running("magmax") and not supports_running("ties")
    assert not supports_running("single") and not supports_running("no-such-method")


def test_a_fold_killed_half_way_leaves_the_current_state_as_it_was(tmp_path, monkeypatch):
    paths = write_taus(tmp_path, task_vectors(3, seed=3))
    current = tmp_path / "s0.safetensors"
    fold_task_vector("negmerge", None, paths[0], 0, None, current)
    before = current.read_bytes()

    from negmerge import io

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the worker dies while writing the new state

    monkeypatch.setattr(io.SafetensorsWriter, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        fold_task_vector("negmerge", None, paths[1], 1, current, tmp_path / "s1.safetensors")
    monkeypatch.undo()
    # No half-written new state, the current one unchanged: variant 1 is simply not in it.
    assert not (tmp_path / "s1.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert current.read_bytes() == before
    assert PartialMerge.load(current).variants == (0,)
    # Run again (the re-run of variant 1), it is folded once.
    fold_task_vector("negmerge", None, paths[1], 1, current, tmp_path / "s1.safetensors")
    assert PartialMerge.load(tmp_path / "s1.safetensors").variants == (0, 1)


def test_a_variant_delivered_twice_is_not_folded_twice(tmp_path):
    paths = write_taus(tmp_path, task_vectors(3, seed=4))
    fold_task_vector("negmerge", None, paths[0], 0, None, tmp_path / "s0")
    fold_task_vector("negmerge", None, paths[1], 1, tmp_path / "s0", tmp_path / "s1")
    with pytest.raises(MergeError, match="holds variant 1 already"):
        fold_task_vector("negmerge", None, paths[1], 1, tmp_path / "s1", tmp_path / "s2")
    # Two workers that both hold a variant (one lost its lease after folding) are refused.
    fold_task_vector("negmerge", None, paths[1], 1, None, tmp_path / "other")
    with pytest.raises(MergeError, match=r"variant\(s\) \[1\]"):
        combine_states([tmp_path / "s1", tmp_path / "other"])
