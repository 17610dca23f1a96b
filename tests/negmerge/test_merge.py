"""Every merge method against a plain in-memory formula written here, on random inputs.

Values are drawn from a small set of dyadic numbers, so every sum is exact in any order and the
comparisons can demand bit-for-bit equality."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from negmerge.errors import MergeError
from negmerge.io import load_state_dict, save_file
from negmerge.merge import METHODS, get_method, streaming
from negmerge.merge.partial import PartialMerge, partial_merge
from negmerge.merge.streaming import merge_files, merge_task_vectors

DYADIC = [0.0, 0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 3.0, -3.0, 0.125]


# ---- the reference rules, written plainly over stacked tensors ----------------------------


def sequential_sum(taus: list[torch.Tensor]) -> torch.Tensor:
    total = taus[0].clone()
    for tau in taus[1:]:
        total = total + tau
    return total


def negmerge_reference(taus: list[torch.Tensor], consensus: float = 1.0) -> torch.Tensor:
    stacked = torch.stack(taus)
    n = len(taus)
    if consensus == 1.0:  # the paper: all strictly positive or all strictly negative
        keep = (stacked > 0).all(0) | (stacked < 0).all(0)
    else:
        need = -(-int(round(consensus * 1000)) * n // 1000)  # ceil(q * n) in integers
        keep = ((stacked > 0).sum(0) >= need) | ((stacked < 0).sum(0) >= need)
    return torch.where(keep, sequential_sum(taus) / n, torch.zeros(()))


def uniform_reference(taus: list[torch.Tensor]) -> torch.Tensor:
    return sequential_sum(taus) / len(taus)


def magmax_reference(taus: list[torch.Tensor]) -> torch.Tensor:
    """The official MagMax loop: a later task vector replaces the value where its magnitude
    is >= the value kept so far, so the last of equal magnitudes wins."""
    kept = taus[0].clone()
    for tau in taus[1:]:
        kept = torch.where(tau.abs() >= kept.abs(), tau, kept)
    return kept


def ties_reference(vectors: list[dict[str, torch.Tensor]], topk: float) -> dict[str, torch.Tensor]:
    """The TIES reference implementation's steps, over each vector flattened whole."""
    keys = list(vectors[0])
    flat = torch.stack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vectors])
    d = flat.shape[1]
    k = d - int(d * (topk / 100))
    if k == 0:
        trimmed = flat
    else:
        kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(sequential_sum(list(trimmed)))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = sequential_sum(list(selected)) / (selected != 0).sum(0).float().clamp(min=1)
    out, offset = {}, 0
    for key in keys:
        size = vectors[0][key].numel()
        out[key] = merged[offset : offset + size].reshape(vectors[0][key].shape)
        offset += size
    return out


def reference(method: str, vectors: list[dict[str, torch.Tensor]], params: dict) -> dict:
    if method == "ties":
        return ties_reference(vectors, params.get("topk", 20.0))
    if method == "single":
        return {key: t.float() for key, t in vectors[params.get("index", 0)].items()}
    rule = {
        "negmerge": lambda taus: negmerge_reference(taus, params.get("consensus", 1.0)),
        "uniform": uniform_reference,
        "magmax": magmax_reference,
    }[method]
    return {key: rule([v[key].float() for v in vectors]) for key in vectors[0]}


# ---- strategies ---------------------------------------------------------------------------


@st.composite
def task_vectors(draw, max_n: int = 6) -> list[dict[str, torch.Tensor]]:
    n = draw(st.integers(1, max_n))
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=3))
    vectors = []
    for _ in range(n):
        vector = {}
        for i, shape in enumerate(shapes):
            values = draw(
                st.lists(
                    st.sampled_from(DYADIC), min_size=math.prod(shape), max_size=math.prod(shape)
                )
            )
            vector[f"layer{i}.weight"] = torch.tensor(values, dtype=torch.float32).reshape(shape)
        vectors.append(vector)
    return vectors


METHOD_PARAMS = st.sampled_from(
    [
        ("negmerge", {}),
        ("negmerge", {"consensus": 0.75}),
        ("negmerge", {"consensus": 0.6}),
        ("negmerge", {"consensus": 0.9}),
        ("uniform", {}),
        ("magmax", {}),
        ("ties", {}),
        ("ties", {"topk": 50.0}),
        ("ties", {"topk": 100.0}),
        ("single", {}),
    ]
)


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == torch.float32, key
        assert torch.equal(actual[key], expected[key]), (key, actual[key], expected[key])


# ---- the tests ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(vectors=task_vectors(), method_params=METHOD_PARAMS)
def test_in_memory_merge_equals_reference(vectors, method_params):
    method, params = method_params
    result = merge_task_vectors(method, vectors, params)
    expected = reference(method, vectors, params)
    assert_same(result.tensors, expected)
    total = sum(t.numel() for t in expected.values())
    nonzero = sum(int(torch.count_nonzero(t)) for t in expected.values())
    assert result.kept_fraction == pytest.approx(nonzero / total)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(vectors=task_vectors(max_n=5), method_params=METHOD_PARAMS, chunk=st.integers(1, 9))
def test_streamed_file_merge_equals_reference(tmp_path_factory, vectors, method_params, chunk):
    """Fine-tuned checkpoints on disk, sliced into chunks that split tensors, with an integer
    buffer and a bf16 tensor among them: the same numbers as the formula."""
    method, params = method_params
    folder = tmp_path_factory.mktemp("merge")
    pre = {key: torch.zeros_like(t) for key, t in vectors[0].items()}
    pre["norm.num_batches_tracked"] = torch.tensor(3)
    pre["scale"] = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    save_file(pre, folder / "pre.safetensors")
    paths, taus = [], []
    for k, vector in enumerate(vectors):
        bf16_step = torch.tensor([DYADIC[(k + j) % len(DYADIC)] for j in range(3)])
        ft = {key: pre[key] + vector[key] for key in vector}
        ft["norm.num_batches_tracked"] = torch.tensor(3 + k)
        ft["scale"] = (pre["scale"].float() + bf16_step).bfloat16()
        save_file(ft, folder / f"ft{k}.safetensors")
        paths.append(folder / f"ft{k}.safetensors")
        taus.append({**vector, "scale": ft["scale"].float() - pre["scale"].float()})
    result = merge_files(
        method, paths, folder / "out.safetensors", folder / "pre.safetensors", params, chunk
    )
    merged = load_state_dict(folder / "out.safetensors")
    assert "norm.num_batches_tracked" not in merged  # integer buffers are not part of tau
    expected = reference(method, taus, params)
    assert_same(dict(sorted(merged.items())), dict(sorted(expected.items())))
    assert result.n == len(vectors)


@settings(max_examples=100, deadline=None)
@given(
    vectors=task_vectors(max_n=7),
    method=st.sampled_from(["negmerge", "uniform", "magmax"]),
    data=st.data(),
)
def test_partial_merges_combine_associatively(vectors, method, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(vectors) - 1, 1)), max_size=3)))
    bounds = [0, *[c for c in cuts if c < len(vectors)], len(vectors)]
    shards = [vectors[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    params = {"consensus": 0.75} if method == "negmerge" and data.draw(st.booleans()) else {}
    combined = partial_merge(method, shards[0], params)
    for shard in shards[1:]:
        combined = combined.combine(partial_merge(method, shard, params))
    assert combined.n == len(vectors)
    assert_same(combined.finish(), merge_task_vectors(method, vectors, params).tensors)


def test_partial_merge_survives_a_round_trip_through_a_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    vectors = [{"w": torch.randn(6, 5, generator=gen)} for _ in range(4)]
    first = partial_merge("negmerge", vectors[:2], {"consensus": 0.75})
    first.save(tmp_path / "shard0.safetensors")
    loaded = PartialMerge.load(tmp_path / "shard0.safetensors")
    combined = loaded.combine(partial_merge("negmerge", vectors[2:], {"consensus": 0.75}))
    expected = merge_task_vectors("negmerge", vectors, {"consensus": 0.75}).tensors
    assert torch.allclose(combined.finish()["w"], expected["w"], rtol=1e-6, atol=1e-7)


def test_ties_cannot_be_merged_in_shards():
    with pytest.raises(MergeError, match="cannot be merged in shards"):
        partial_merge("ties", [{"w": torch.ones(3)}])


def test_official_rule_worked_by_hand():
    """n = 3, five elements:
    element 0: +0.25 +0.75 +0.50 all positive -> (0.25 + 0.75 + 0.5) / 3 = 0.5
    element 1: -0.50 -0.25 -0.75 all negative -> -1.5 / 3 = -0.5
    element 2: +0.50 -0.50 +1.00 signs differ -> 0
    element 3:  0.00 +0.50 +0.25 one exact zero drops it -> 0
    element 4: +1.00 +1.00 +1.00 -> 1.0
    kept 3 of 5. With consensus q = 0.6, ceil(0.6 * 3) = 2 same signs suffice:
    element 2 -> (0.5 - 0.5 + 1.0) / 3 = 1/3, element 3 -> 0.75 / 3 = 0.25, kept 5 of 5."""
    taus = [
        {"w": torch.tensor([0.25, -0.50, 0.50, 0.00, 1.0])},
        {"w": torch.tensor([0.75, -0.25, -0.50, 0.50, 1.0])},
        {"w": torch.tensor([0.50, -0.75, 1.00, 0.25, 1.0])},
    ]
    strict = merge_task_vectors("negmerge", taus)
    assert strict.tensors["w"].tolist() == [0.5, -0.5, 0.0, 0.0, 1.0]
    assert strict.kept_fraction == pytest.approx(3 / 5)
    relaxed = merge_task_vectors("negmerge", taus, {"consensus": 0.6})
    assert relaxed.tensors["w"].tolist() == pytest.approx([0.5, -0.5, 1 / 3, 0.25, 1.0])
    assert relaxed.kept_fraction == 1.0


def test_consensus_threshold_is_exact_where_binary_floats_are_not():
    # 0.56 * 25 is 14.000000000000002 in binary floating point; 14 agreeing signs must suffice.
    assert math.ceil(0.56 * 25) == 15 and math.ceil(Fraction("0.56") * 25) == 14
    taus = [{"w": torch.tensor([1.0])}] * 14 + [{"w": torch.tensor([-1.0])}] * 11
    merged = merge_task_vectors("negmerge", taus, {"consensus": 0.56}).tensors["w"].item()
    assert merged == pytest.approx(3 / 25)


def test_magmax_gives_exact_magnitude_ties_to_the_later_task_vector():
    taus = [
        {"w": torch.tensor([0.5, -0.5, 2.0, 0.0])},
        {"w": torch.tensor([-0.5, 0.5, -1.0, -0.0])},
        {"w": torch.tensor([0.25, -0.5, -2.0, 0.0])},
    ]
    expected = magmax_reference([t["w"] for t in taus])
    assert expected.tolist() == [-0.5, -0.5, -2.0, 0.0]
    merged = merge_task_vectors("magmax", taus).tensors["w"]
    assert torch.equal(merged, expected)
    assert torch.equal(merged.signbit(), expected.signbit())  # even -0.0 vs 0.0
    # Merged in shards, the later shard's value still wins a tie.
    first, second = partial_merge("magmax", taus[:2]), partial_merge("magmax", taus[2:])
    assert torch.equal(first.combine(second).finish()["w"], expected)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_task_vector_with_nan_or_inf_is_refused_naming_it(method, bad, tmp_path):
    good = {"a": torch.ones(4), "w": torch.tensor([0.5, -1.0, 2.0])}
    diverged = {"a": torch.ones(4), "w": torch.tensor([0.5, bad, 2.0])}
    vectors = [good, diverged, good]
    with pytest.raises(MergeError, match=r"task vector 2: key 'w' holds NaN or Inf"):
        merge_task_vectors(method, vectors, {"index": 1} if method == "single" else {})
    paths = []
    for i, vector in enumerate(vectors):
        paths.append(tmp_path / f"tau{i}.safetensors")
        save_file(vector, paths[-1])
    output = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError, match=rf"{paths[1]}: key 'w' holds NaN or Inf"):
        merge_files(method, paths, output, params={"index": 1} if method == "single" else {})
    assert not output.exists() and not list(tmp_path.glob(".merged*"))


def test_one_task_vector_is_kept_where_nonzero():
    tau = {"w": torch.tensor([0.5, 0.0, -2.0])}
    for method in ["negmerge", "uniform", "magmax", "single"]:
        assert merge_task_vectors(method, [tau]).tensors["w"].tolist() == [0.5, 0.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    # 2048 + 1 + 1 + ... is lost in bf16/fp16 accumulation, kept in fp32.
    taus = [{"w": torch.tensor([2048.0]).to(dtype)}] + [{"w": torch.tensor([1.0]).to(dtype)}] * 8
    merged = merge_task_vectors("uniform", taus).tensors["w"]
    assert merged.dtype == torch.float32
    assert merged.item() == pytest.approx(2056 / 9, rel=1e-7)


def test_gaussian_task_vectors_match_the_formula_closely():
    """Ordinary floats, where summation order may round differently: close to the formula."""
    gen = torch.Generator().manual_seed(1)
    vectors = [
        {"a": torch.randn(64, 33, generator=gen), "b": torch.randn(7, generator=gen)}
        for _ in range(10)
    ]
    for method, params in [
        ("negmerge", {}),
        ("uniform", {}),
        ("magmax", {}),
        ("ties", {"topk": 20.0}),
    ]:
        result = merge_task_vectors(method, vectors, params).tensors
        expected = reference(method, vectors, params)
        for key in expected:
            assert torch.allclose(result[key], expected[key], rtol=1e-6, atol=1e-7), (method, key)


def test_every_registered_method_is_tested():
    assert set(METHODS) == {"negmerge", "uniform", "ties", "magmax", "single"}


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("negmerge", {"consensus": 0.5}, "consensus: Input should be greater than 0.5"),
        ("negmerge", {"consensus": 1.5}, "consensus: Input should be less than or equal to 1"),
        ("negmerge", {"topk": 20}, "topk: not a parameter"),
        ("ties", {"topk": 0}, "topk: Input should be greater than 0"),
        ("single", {"index": 4}, "index 4 is out of range for n = 3"),
        ("nope", {}, "unknown 'nope'; choose one of magmax, negmerge, single, ties, uniform"),
    ],
)
def test_bad_parameters_name_the_parameter(name, params, message):
    with pytest.raises(MergeError, match=message.replace("(", r"\(")):
        get_method(name, 3, **params)


def test_no_task_vectors_is_an_error(tmp_path: Path):
    with pytest.raises(MergeError, match="n = 0"):
        merge_task_vectors("negmerge", [])
    with pytest.raises(MergeError, match="n = 0"):
        merge_files("negmerge", [], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunks_reduced_in_smaller_slices_give_the_same_merge(tmp_path, monkeypatch, method):
    """The engine reads chunks and reduces them in cache-sized slices; shrink both so that
    slices split chunks and chunks split tensors."""
    monkeypatch.setattr(streaming, "SLICE_ELEMENTS", 7)
    gen = torch.Generator().manual_seed(3)
    values = torch.tensor(DYADIC)
    pre = {"a": torch.zeros(13, 11), "b": torch.zeros(29)}
    save_file(pre, tmp_path / "pre.safetensors")
    vectors, paths = [], []
    for k in range(5):
        vector = {
            key: values[torch.randint(len(DYADIC), t.shape, generator=gen)]
            for key, t in pre.items()
        }
        save_file(vector, tmp_path / f"ft{k}.safetensors")
        vectors.append(vector)
        paths.append(tmp_path / f"ft{k}.safetensors")
    merge_files(
        method, paths, tmp_path / "out.safetensors", tmp_path / "pre.safetensors", chunk_elements=50
    )
    assert_same(load_state_dict(tmp_path / "out.safetensors"), reference(method, vectors, {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.float8_e4m3fn])
@pytest.mark.parametrize("method", ["negmerge", "uniform", "magmax"])
def test_files_of_other_float_dtypes_merge_in_fp32(tmp_path, dtype, method):
    """Read without torch, converted to fp32 exactly as torch's .float() does."""
    gen = torch.Generator().manual_seed(5)
    pre = {"w": torch.randn(40, 3, generator=gen).to(dtype)}
    save_file(pre, tmp_path / "pre.safetensors")
    paths, taus = [], []
    for k in range(4):
        ft = {"w": (pre["w"].float() + torch.randn(40, 3, generator=gen) * 0.3).to(dtype)}
        save_file(ft, tmp_path / f"ft{k}.safetensors")
        paths.append(tmp_path / f"ft{k}.safetensors")
        taus.append({"w": ft["w"].float() - pre["w"].float()})
    merge_files(method, paths, tmp_path / "out.safetensors", tmp_path / "pre.safetensors")
    expected = merge_task_vectors(method, taus).tensors
    assert_same(load_state_dict(tmp_path / "out.safetensors"), expected)
