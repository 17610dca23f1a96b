from __future__ import annotations

import json
import subprocess
import sys

import torch
from click.testing import CliRunner

from negmerge.cli import main
from negmerge.io import load_state_dict, open_checkpoint
from negmerge.merge.streaming import merge_task_vectors
from negmerge.task_vector import subtract_task_vector, task_vector


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_merge_then_apply_gives_the_unlearned_model(checkpoints, tmp_path):
    pre_path, ft_paths, pre, fts = checkpoints
    out = run(
        "merge",
        "--pretrained",
        pre_path,
        "--method",
        "negmerge",
        "-o",
        tmp_path / "tv.safetensors",
        *ft_paths,
    )
    assert out.exit_code == 0, out.output
    expected = merge_task_vectors("negmerge", [task_vector(pre, ft) for ft in fts])
    assert f"kept          {expected.kept_fraction:.2%}" in out.output
    merged = load_state_dict(tmp_path / "tv.safetensors")
    for key, value in expected.tensors.items():
        assert torch.equal(merged[key], value), key
    with open_checkpoint(tmp_path / "tv.safetensors") as ckpt:
        assert ckpt.metadata["method"] == "negmerge" and ckpt.metadata["n"] == "4"
        assert json.loads(ckpt.metadata["input_sha256"]) == [
            open_checkpoint(p).sha256() for p in ft_paths
        ]

    out = run(
        "apply",
        "--pretrained",
        pre_path,
        "--vector",
        tmp_path / "tv.safetensors",
        "--scale",
        "0.8",
        "-o",
        tmp_path / "model.safetensors",
    )
    assert out.exit_code == 0, out.output
    model = load_state_dict(tmp_path / "model.safetensors")
    reference = subtract_task_vector(pre, expected.tensors, 0.8)
    assert all(torch.equal(model[k], reference[k]) for k in reference)


def test_merge_json_output_and_method_parameters(checkpoints, tmp_path):
    pre_path, ft_paths, _, _ = checkpoints
    out = run(
        "merge",
        "--pretrained",
        pre_path,
        "--method",
        "ties",
        "--topk",
        "30",
        "--json",
        "-o",
        tmp_path / "t.safetensors",
        *ft_paths,
    )
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["method"] == "ties" and result["params"] == {"topk": 30.0} and result["n"] == 4
    assert 0 < result["kept_fraction"] <= 1


def test_errors_are_one_line_and_exit_non_zero(checkpoints, tmp_path):
    pre_path, ft_paths, _, _ = checkpoints
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    cases = [
        (["--pretrained", pre_path], "n = 0"),
        (
            ["--pretrained", pre_path, tmp_path / "missing.safetensors"],
            "missing.safetensors: no such file",
        ),
        (
            ["--pretrained", pre_path, tmp_path / "bad.pt"],
            "bad.pt: key 'encoder.weight' is float32[2]",
        ),
        (
            ["--pretrained", pre_path, "--consensus", "0.3", *ft_paths],
            "consensus: Input should be greater than 0.5",
        ),
        (["--pretrained", pre_path, "--topk", "10", *ft_paths], "topk: not a parameter"),
    ]
    for args, message in cases:
        out = run("merge", "-o", tmp_path / "x.safetensors", *args)
        assert out.exit_code != 0
        assert message in out.output, out.output
        assert len([line for line in out.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(checkpoints, tmp_path):
    pre_path, ft_paths, _, _ = checkpoints
    before = ft_paths[1].read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(ft_paths[1])
    for output in (ft_paths[1], link):
        out = run("merge", "--pretrained", pre_path, "-o", output, *ft_paths)
        assert out.exit_code != 0 and "is also an input" in out.output, out.output
    out = run(
        "apply", "--pretrained", pre_path, "--vector", ft_paths[0], "--scale", "1", "-o", pre_path
    )
    assert out.exit_code != 0 and "is also an input" in out.output, out.output
    assert ft_paths[1].read_bytes() == before


def test_apply_tells_a_checkpoint_from_a_task_vector(checkpoints, tmp_path):
    pre_path, ft_paths, _, _ = checkpoints
    out = run(
        "apply", "--pretrained", pre_path, "--vector", ft_paths[0], "--scale", "1",
        "-o", tmp_path / "y.safetensors",
    )  # fmt: skip
    assert out.exit_code != 0
    assert "a task vector holds only floating-point tensors" in out.output, out.output
    assert not (tmp_path / "y.safetensors").exists()


def test_merge_runs_without_importing_torch_or_the_service(checkpoints, tmp_path):
    """Importing torch alone takes more memory than a ViT-B/32 checkpoint: `negmerge merge`
    must not, nor load the service's plugin commands."""
    pre_path, ft_paths, _, _ = checkpoints
    args = ["merge", "--pretrained", str(pre_path), "-o", str(tmp_path / "tv.safetensors")]
    code = (
        "import sys; from negmerge.cli import main; "
        f"main({[*args, *map(str, ft_paths)]!r}, standalone_mode=False); "
        "loaded = [m for m in ('torch', 'app', 'worker') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (tmp_path / "tv.safetensors").exists()


def test_merge_stores_sparse_unless_asked_for_dense_and_apply_reads_both(checkpoints, tmp_path):
    pre_path, ft_paths, _, _ = checkpoints
    sizes = {}
    for flag in ("", "--dense", "--sparse"):
        name = flag.strip("-") or "default"
        args = ["merge", "--pretrained", pre_path, "-o", tmp_path / f"{name}.safetensors"]
        out = run(*args, *([flag] if flag else []), *ft_paths)
        assert out.exit_code == 0, out.output
        size = (tmp_path / f"{name}.safetensors").stat().st_size
        layout = "dense" if flag == "--dense" else "sparse"
        assert f"size          {size / (1 << 20):.2f} MiB {layout} (" in out.output
        sizes[name] = size
        out = run(
            "apply",
            "--pretrained",
            pre_path,
            "--vector",
            tmp_path / f"{name}.safetensors",
            "--scale",
            "0.5",
            "-o",
            tmp_path / f"model-{name}.safetensors",
        )
        assert out.exit_code == 0, out.output
    assert sizes["default"] == sizes["sparse"] < sizes["dense"]
    models = [load_state_dict(tmp_path / f"model-{n}.safetensors") for n in sizes]
    for key, tensor in models[0].items():
        assert all(torch.equal(m[key], tensor) for m in models[1:]), key

    out = run(
        "merge",
        "--pretrained",
        pre_path,
        "-o",
        tmp_path / "j.safetensors",
        "--json",
        ft_paths[0],
        ft_paths[1],
    )
    result = json.loads(out.output)
    assert result["output_bytes"] == (tmp_path / "j.safetensors").stat().st_size
    assert result["layout"] in ("sparse", "dense") and result["dense_bytes"] > 0
