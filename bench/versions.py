"""Model versions stored as their parent plus a sparse delta, against storing each dense.

A chain of unlearned versions of a ViT-B/32 image-tower-sized model (float32, open_clip's key
layout, bench/merge.py's shapes): each version is its parent minus lambda * tau, with tau
keeping a fraction of the elements (default 6.45%: bench/merge.py's merged vector at n = 30),
computed as the service does (float32). For each version it reports, side by side:

  size          the dense file against its delta (negmerge.version_delta: bitmask + XOR values)
  store         writing the dense file (negmerge.io.save_file) against writing the delta from
                the parent's and the child's dense files (app.version_store's step)
  materialise   streaming the dense bytes and hashing them: reading the dense file (the plain
                baseline, what a download of a dense version costs) against rebuilding them
                from the chain (base + every delta, one slice of each at a time)

Warm page cache; best of --repeat for the timed reads.

Run:  python bench/versions.py [--params 22e6] [--versions 5] [--kept 0.0645]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.merge import vit_b32_image_tower  # noqa: E402
from negmerge.io import file_sha256, save_file  # noqa: E402
from negmerge.version_delta import DenseReader, materialise, write_delta  # noqa: E402

_BLOCK = 8 * 1024 * 1024


def chain(folder: Path, count: int, scale: float, kept: float) -> list[dict]:
    """v0 (dense) and `count` versions after it, each stored dense and as a delta."""
    rng = np.random.default_rng(0)
    shapes = vit_b32_image_tower(scale=scale)
    tensors = {k: (rng.standard_normal(s, np.float32) * 0.02) for k, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "v0.safetensors"
    save_file(tensors, first)
    versions = [{"dense": first, "sha256": file_sha256(first)}]
    for n in range(1, count + 1):
        for key, value in tensors.items():
            tau = rng.standard_normal(value.shape, np.float32) * 1e-3
            tau *= rng.random(value.shape, np.float32) < kept
            tensors[key] = (value - np.float32(0.8) * tau).astype(np.float32)
        dense = folder / f"v{n}.safetensors"
        began = time.perf_counter()
        save_file(tensors, dense)
        dense_seconds = time.perf_counter() - began
        sha256 = file_sha256(dense)
        delta = folder / f"v{n}.delta.safetensors"
        parent = versions[-1]
        began = time.perf_counter()
        assert write_delta(
            parent["dense"],
            dense,
            delta,
            parent_sha256=parent["sha256"],
            child_sha256=sha256,
            depth=n,
            extra_metadata={"delta_parent": f"v{n - 1}"},
        )
        delta_seconds = time.perf_counter() - began
        versions.append(
            {
                "dense": dense,
                "delta": delta,
                "sha256": sha256,
                "store_dense": dense_seconds,
                "store_delta": delta_seconds,
            }
        )
    return versions


def read_dense(path: Path) -> tuple[float, str]:
    began = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return time.perf_counter() - began, digest.hexdigest()


def read_chain(base: Path, deltas: list[Path], sha256: str) -> tuple[float, str]:
    began = time.perf_counter()
    digest = hashlib.sha256()
    with open(base, "rb") as f:
        for block in materialise(DenseReader(f), deltas, sha256):
            digest.update(block)
    return time.perf_counter() - began, digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=22e6, help="88e6: ViT-B/32's tower")
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--kept", type=float, default=0.0645)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=ROOT / "var" / "bench-versions")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    scale = args.params / 88e6
    versions = chain(args.folder, args.versions, scale, args.kept)
    title = (
        f"Versions dense vs parent + sparse delta, ViT-B/32 tower x{scale:g}, "
        f"{args.kept:.2%} changed per version, warm page cache"
    )
    table = Table(title=title)
    columns = ["version", "depth", "dense size", "delta size", "vs dense"]
    columns += ["store dense", "store delta", "vs dense"]
    columns += ["materialise dense", "from chain", "vs dense", "same sha256"]
    for column in columns:
        table.add_column(column, justify="right")
    for n, version in enumerate(versions[1:], start=1):
        deltas = [v["delta"] for v in versions[1 : n + 1]]
        dense_read = min(read_dense(version["dense"])[0] for _ in range(args.repeat))
        runs = [
            read_chain(versions[0]["dense"], deltas, version["sha256"]) for _ in range(args.repeat)
        ]
        chain_read = min(seconds for seconds, _ in runs)
        dense_bytes, delta_bytes = version["dense"].stat().st_size, version["delta"].stat().st_size
        table.add_row(
            f"v{n}",
            str(n),
            f"{dense_bytes / 2**20:.1f} MiB",
            f"{delta_bytes / 2**20:.1f} MiB",
            f"{delta_bytes / dense_bytes:.3f}x",
            f"{version['store_dense']:.2f} s",
            f"{version['store_delta']:.2f} s",
            f"{version['store_delta'] / version['store_dense']:.2f}x",
            f"{dense_read:.2f} s",
            f"{chain_read:.2f} s",
            f"{chain_read / dense_read:.2f}x",
            str(all(sha == version["sha256"] for _, sha in runs)),
        )
    Console(width=180).print(table)
    total_dense = sum(v["dense"].stat().st_size for v in versions[1:])
    total_delta = sum(v["delta"].stat().st_size for v in versions[1:])
    print(
        f"{args.versions} versions: {total_dense / 2**20:.0f} MiB dense, "
        f"{total_delta / 2**20:.0f} MiB as deltas ({total_delta / total_dense:.3f}x). "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end."
    )
    for path in args.folder.glob("v*.safetensors"):
        path.unlink()


if __name__ == "__main__":
    main()
