"""Streaming merge against the read floor and a load-everything merge, side by side.

For n = 10 and n = 30 fine-tuned checkpoints of ViT-B/32 image-tower size (about 88M float32
parameters each, open_clip's key layout) it measures, each in a fresh process:

  read floor     the time just to read every input file once (8 MiB blocks), no arithmetic
  ours           `merge_files("negmerge", ...)`: streamed, inputs hashed, output written
  ours, known    the same with the inputs' sha256 passed in (as the service does: its task
                 vectors are content-addressed), so nothing is hashed
  load-all       a plain implementation: load every checkpoint, stack per key, apply the rule

  read + hash    reading every input once and computing its sha256, on one thread: the floor
                 to compare "ours" with, since it has to hash every input too
  CLI            `negmerge merge` as a user runs it: the whole process, start-up included

"ours" runs as the CLI does, without torch (it needs none); "in a worker" imports torch first,
as a worker process has it loaded anyway. Prints time and peak RSS with ratios. The page cache
is warm for all (a warm-up read runs first).

A second table compares the merged vector stored sparse (negmerge.sparse: a bitmask and the
kept values per tensor, the default) with the same vector stored dense: file size, the merge's
time writing each, `negmerge apply`'s time and peak RSS reading each, the time to read every
slice (apply's reads, without its arithmetic), and the memory the lambda search holds (the
vector loaded with `load_task_vector` and every tensor densified once: RSS above imports).

Run:  python bench/merge.py [--n 10 30] [--storage-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vit_b32_image_tower(width: int = 768, layers: int = 12, scale: float = 1.0) -> dict[str, tuple]:
    """Key names and shapes of open_clip's ViT-B/32 image tower (~88M parameters)."""
    width = max(8, int(width * scale**0.5) // 8 * 8)
    shapes: dict[str, tuple] = {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (50, width),
        "visual.conv1.weight": (width, 3, 32, 32),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
    }
    for i in range(layers):
        block = f"visual.transformer.resblocks.{i}"
        shapes |= {
            f"{block}.ln_1.weight": (width,),
            f"{block}.ln_1.bias": (width,),
            f"{block}.attn.in_proj_weight": (3 * width, width),
            f"{block}.attn.in_proj_bias": (3 * width,),
            f"{block}.attn.out_proj.weight": (width, width),
            f"{block}.attn.out_proj.bias": (width,),
            f"{block}.ln_2.weight": (width,),
            f"{block}.ln_2.bias": (width,),
            f"{block}.mlp.c_fc.weight": (4 * width, width),
            f"{block}.mlp.c_fc.bias": (4 * width,),
            f"{block}.mlp.c_proj.weight": (width, 4 * width),
            f"{block}.mlp.c_proj.bias": (width,),
        }
    shapes |= {"visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,)}
    shapes["visual.proj"] = (width, 512)
    return shapes


def generate(folder: Path, n: int, scale: float) -> tuple[Path, list[Path]]:
    """pretrained.safetensors and n fine-tuned variants: a shared update plus per-run noise."""
    import torch

    from negmerge.io import save_file

    folder.mkdir(parents=True, exist_ok=True)
    pre_path = folder / "pretrained.safetensors"
    paths = [folder / f"finetuned-{k:02d}.safetensors" for k in range(n)]
    if pre_path.exists() and all(p.exists() for p in paths):
        return pre_path, paths
    gen = torch.Generator().manual_seed(0)
    shapes = vit_b32_image_tower(scale=scale)
    pre = {key: torch.randn(shape, generator=gen) * 0.02 for key, shape in shapes.items()}
    save_file(pre, pre_path)
    shared = {key: torch.randn(t.shape, generator=gen) * 1e-4 for key, t in pre.items()}
    for k, path in enumerate(paths):
        if not path.exists():
            # Each variant's noise from a seed of its own: a folder made for a smaller n and
            # grown later holds the same files as one made at once, and no two alike.
            noise = torch.Generator().manual_seed(1 + k)
            save_file(
                {
                    key: v + shared[key] + torch.randn(v.shape, generator=noise) * 1e-4
                    for key, v in pre.items()
                },
                path,
            )
    return pre_path, paths


def known_hashes(folder: Path) -> dict[str, str]:
    """The files' sha256, computed once and kept beside them (as a content store knows them)."""
    from negmerge.io import file_sha256

    record = folder / "sha256.json"
    hashes = json.loads(record.read_text()) if record.exists() else {}
    # A folder made for a smaller n gains files when a larger n is asked for.
    missing = [p for p in sorted(folder.glob("*.safetensors")) if p.name not in hashes]
    if missing:
        hashes.update({p.name: file_sha256(p) for p in missing})
        record.write_text(json.dumps(hashes))
    return hashes


def read_floor(paths: list[Path], hashing: bool = False) -> None:
    import hashlib

    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(view):
                if hashing:
                    digest.update(view[:got])


def ours(
    pre: Path,
    paths: list[Path],
    output: Path,
    hashes: dict[str, str] | None,
    layout: str = "auto",
) -> dict:
    from negmerge.merge.streaming import merge_files

    known = {}
    if hashes is not None:
        known = {
            "input_sha256": [hashes[p.name] for p in paths],
            "pretrained_sha256": hashes[pre.name],
        }
    result = merge_files("negmerge", paths, output, pretrained=pre, layout=layout, **known)
    return {"kept_fraction": result.kept_fraction, "bytes": result.output_bytes}


def stored_vector(folder: Path, layout: str) -> Path:
    return folder / f"merged-{layout}.safetensors"


def load_all(pre: Path, paths: list[Path], output: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(pre)
    finetuned = [load_file(p) for p in paths]
    merged = {}
    for key, value in base.items():
        stacked = torch.stack([ft[key] - value for ft in finetuned])
        keep = (stacked > 0).all(0) | (stacked < 0).all(0)
        merged[key] = torch.where(keep, stacked.sum(0) / len(finetuned), 0.0)
    save_file(merged, output)
    return {}


def measure(kind: str, folder: Path, n: int) -> None:
    """Run one contender in this (fresh) process and print its time and peak RSS as JSON."""
    pre = folder / "pretrained.safetensors"
    paths = [folder / f"finetuned-{k:02d}.safetensors" for k in range(n)]
    output = folder / f"out-{kind}.safetensors"
    keep_output = kind.startswith("merge-")
    if keep_output:  # the storage table's vectors, kept for its apply runs
        output = stored_vector(folder, kind.removeprefix("merge-"))
        output.unlink(missing_ok=True)
    if kind.startswith(("apply-", "hold-")):
        import torch  # noqa: F401 (apply needs it; loaded before timing, as in a worker)

        import negmerge.task_vector  # noqa: F401
    if kind in ("ours-worker", "load-all"):  # loaded before timing, as a worker has them
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    if kind.startswith("ours"):
        import negmerge.merge.streaming  # noqa: F401
    hashes = json.loads((folder / "sha256.json").read_text())
    before_mb = _memory_mb("VmRSS")
    began = time.perf_counter()
    extra = {}
    if kind in ("floor", "floor-hash"):
        read_floor([pre, *paths], hashing=kind == "floor-hash")
    elif kind == "ours":
        extra = ours(pre, paths, output, None)
    elif kind in ("ours-known", "ours-worker"):
        extra = ours(pre, paths, output, hashes)
    elif kind == "load-all":
        extra = load_all(pre, paths, output)
    elif kind.startswith("merge-"):  # the storage table: the same merge, stored each way
        extra = ours(pre, paths, output, hashes, layout=kind.removeprefix("merge-"))
    elif kind.startswith("apply-"):
        from negmerge.task_vector import subtract_task_vector_file

        vector = stored_vector(folder, kind.removeprefix("apply-"))
        subtract_task_vector_file(pre, vector, 0.5, output)
    elif kind.startswith("read-"):  # every 1M-element slice, as apply reads them, no torch
        from negmerge.io import open_checkpoint

        with open_checkpoint(stored_vector(folder, kind.removeprefix("read-"))) as ckpt:
            for key, spec in ckpt.specs.items():
                for start in range(0, spec.numel, 1 << 20):
                    ckpt.read_array(key, start, min(start + (1 << 20), spec.numel))
    elif kind.startswith("hold-"):  # the lambda search: load the vector, densify each tensor
        from negmerge.task_vector import load_task_vector

        vector = load_task_vector(stored_vector(folder, kind.removeprefix("hold-")))
        for key in vector:
            vector[key]
    elif kind == "cli":  # `negmerge merge`, its imports inside the timed run
        from negmerge.cli import main as cli

        args = ["merge", "--pretrained", str(pre), "-o", str(output), *map(str, paths)]
        cli(args, standalone_mode=False)
    seconds = time.perf_counter() - began
    if not keep_output:
        output.unlink(missing_ok=True)
    peak_mb = _memory_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "before_mb": before_mb, **extra}))


def _memory_mb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process. Not ru_maxrss: that one carries the parent's
    peak over fork and exec, and the parent here has had torch loaded."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run(kind: str, folder: Path, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--folder", str(folder), "--n", str(n)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 30])
    parser.add_argument(
        "--params", type=float, default=88e6, help="approximate size (88e6: ViT-B/32)"
    )
    parser.add_argument("--folder", type=Path, default=ROOT / "var" / "bench-merge")
    parser.add_argument("--skip-load-all", action="store_true", help="when memory is short")
    parser.add_argument("--repeat", type=int, default=2, help="runs per contender (best kept)")
    parser.add_argument(
        "--storage-only", action="store_true", help="only the sparse-vs-dense storage table"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.folder, args.n[0])
        return

    from rich.console import Console
    from rich.table import Table

    scale = args.params / 88e6
    if args.storage_only:
        storage_table(args, scale)
        return
    title = (
        f"Streaming merge of n checkpoints, ViT-B/32 image-tower size x{scale:g}, warm page cache"
    )
    table = Table(title=title)
    for column in [
        "n",
        "contender",
        "time",
        "vs read floor",
        "vs read + hash",
        "peak RSS",
        "RSS / checkpoint",
        "RSS above imports",
        "kept",
    ]:
        table.add_column(column, justify="right")
    contenders = [
        ("read floor", "floor"),
        ("read + hash floor", "floor-hash"),
        ("ours (hashes inputs)", "ours"),
        ("ours, hashes known", "ours-known"),
        ("ours, hashes known, in a worker", "ours-worker"),
        ("negmerge merge (CLI, imports included)", "cli"),
    ]
    if not args.skip_load_all:
        contenders.append(("load-all", "load-all"))
    for n in args.n:
        folder = args.folder / f"x{scale:g}"  # n = 10 uses the first ten of n = 30's files
        pre, _ = generate(folder, max(args.n), scale)
        known_hashes(folder)
        checkpoint_mb = pre.stat().st_size / 2**20
        run("floor", folder, n)  # warm the page cache
        results = {}
        for _ in range(args.repeat):  # the best of a few runs: the cores are shared
            for _, kind in contenders:
                if kind == "load-all":
                    continue  # last and once: tens of seconds, and it evicts the page cache
                r = run(kind, folder, n)
                if kind not in results or r["seconds"] < results[kind]["seconds"]:
                    results[kind] = r
        if not args.skip_load_all:
            results["load-all"] = run("load-all", folder, n)
        floor = results["floor"]["seconds"]
        hash_floor = results["floor-hash"]["seconds"]
        for label, kind in contenders:
            r = results[kind]
            hashes = kind in ("floor-hash", "ours", "cli")
            above = r["peak_rss_mb"] - r["before_mb"]
            table.add_row(
                str(n),
                label,
                f"{r['seconds']:.2f} s",
                f"{r['seconds'] / floor:.2f}x",
                f"{r['seconds'] / hash_floor:.2f}x" if hashes else "",
                f"{r['peak_rss_mb']:.0f} MiB",
                f"{r['peak_rss_mb'] / checkpoint_mb:.2f}x",
                f"{above:.0f} MiB",
                f"{r['kept_fraction']:.2%}" if "kept_fraction" in r else "",
                end_section=kind == contenders[-1][1],
            )
    Console(width=160).print(table)
    print(
        f"One checkpoint: {checkpoint_mb:.0f} MiB. Best of {args.repeat} runs each. "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end."
    )
    storage_table(args, scale)


def storage_table(args: argparse.Namespace, scale: float) -> None:
    """The merged vector stored sparse against dense: size, merge time, apply time and RSS."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"The merged vector stored sparse vs dense, ViT-B/32 size x{scale:g}")
    columns = ["n", "kept", "stored", "size", "vs dense", "merge", "vs dense", "apply"]
    columns += ["vs dense", "apply RSS", "vs dense", "read slices", "vs dense"]
    for column in [*columns, "held (search)", "vs dense"]:
        table.add_column(column, justify="right")
    for n in args.n:
        folder = args.folder / f"x{scale:g}"
        generate(folder, max(args.n), scale)
        known_hashes(folder)
        run("floor", folder, n)  # warm the page cache
        results: dict[str, dict] = {}
        for layout in ("dense", "sparse"):  # each merge once: its output is the apply's input
            results[f"merge-{layout}"] = run(f"merge-{layout}", folder, n)
        for _ in range(args.repeat):
            for kind in [
                f"{step}-{layout}"
                for step in ("apply", "read", "hold")
                for layout in ("dense", "sparse")
            ]:
                r = run(kind, folder, n)
                if kind not in results or r["seconds"] < results[kind]["seconds"]:
                    results[kind] = r
        dense = {k.split("-")[0]: v for k, v in results.items() if k.endswith("-dense")}
        for layout in ("dense", "sparse"):
            merge, apply = results[f"merge-{layout}"], results[f"apply-{layout}"]
            read, hold = results[f"read-{layout}"], results[f"hold-{layout}"]
            held = hold["peak_rss_mb"] - hold["before_mb"]
            table.add_row(
                str(n),
                f"{merge['kept_fraction']:.2%}",
                layout,
                f"{merge['bytes'] / 2**20:.1f} MiB",
                f"{merge['bytes'] / dense['merge']['bytes']:.3f}x",
                f"{merge['seconds']:.2f} s",
                f"{merge['seconds'] / dense['merge']['seconds']:.2f}x",
                f"{apply['seconds']:.2f} s",
                f"{apply['seconds'] / dense['apply']['seconds']:.2f}x",
                f"{apply['peak_rss_mb']:.0f} MiB",
                f"{apply['peak_rss_mb'] / dense['apply']['peak_rss_mb']:.2f}x",
                f"{read['seconds']:.2f} s",
                f"{read['seconds'] / dense['read']['seconds']:.2f}x",
                f"{held:.0f} MiB",
                f"{held / (dense['hold']['peak_rss_mb'] - dense['hold']['before_mb']):.2f}x",
                end_section=layout == "sparse",
            )
        for layout in ("dense", "sparse"):
            stored_vector(folder, layout).unlink(missing_ok=True)
    Console(width=160).print(table)
    print(
        f"Merges with the inputs' hashes known, once each; applies best of {args.repeat}. "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end."
    )


if __name__ == "__main__":
    main()
