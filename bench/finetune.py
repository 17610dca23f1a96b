"""Fine-tuning benchmarks, one table per function; `main` prints each.

    .venv/bin/python bench/finetune.py [--images 128] [--batches 10] [--workers 0 1 2]

data_path_table: images/s of the training data path alone (no model: what a GPU step would
be fed), for 224 px model input and RandAugment rand-m9-n2 through the project's own
train_pipeline (negmerge.models.base), with CLIP ViT-B/32's evaluation preprocessing. The
images are JPEG photos of ImageNet's typical size (500 x 375), written to a temporary folder.
Rows: loader workers (0: in the training process) x decoded cache (off: decode and resize
every image every epoch; on: once per job, negmerge.loading.DecodedImages), beside the
path on main before this change (augment at the decoded size, decode every time, in the
training process) and the ideal, linear in processes (the 0-worker rate of the same path
times the workers). Each rate is over the batches after the first; the time to the first
batch (worker start-up included, paid once per variant) is shown beside it. One thread per
process (torch, and the loader workers' own default), so the rows compare processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

AUGMENT = "rand-m9-n2"
INPUT_SIZE = 224
SOURCE_SIZE = (500, 375)
BATCH = 32


def write_photos(folder: Path, n: int) -> Path:
    """`n` JPEG images with photo-like content (smooth gradients and noise) and a manifest."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = SOURCE_SIZE
    rows = []
    for i in range(n):
        x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
        base = np.stack([x * rng.uniform(50, 255), y * rng.uniform(50, 255), (x + y) * 90], -1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        name = f"img-{i:04d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        rows.append({"id": f"img-{i}", "path": name, "label": ["a", "b"][i % 2]})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def clip_like_model():
    """An UnlearningModel whose transforms are CLIP ViT-B/32's (the module is not used)."""
    import open_clip
    from open_clip.transform import image_transform
    from torch import nn

    from negmerge.models.base import UnlearningModel

    return UnlearningModel(
        module=nn.Identity(),
        classes=["a", "b"],
        tau_keys=[],
        eval_transform=image_transform(INPUT_SIZE, is_train=False),
        mean=tuple(open_clip.OPENAI_DATASET_MEAN),
        full_state=dict,
    )


def rate(loader, batches: int) -> tuple[float, float]:
    """Seconds to the first of `batches` batches of `loader`, and images per second over
    the others."""
    began, images, first = time.perf_counter(), 0, 0.0
    for count, (batch, _labels) in enumerate(loader, start=1):
        if count == 1:
            first = time.perf_counter()
        else:
            images += len(batch)
        if count == batches:
            break
    return first - began, images / (time.perf_counter() - first)


def data_path_table(n_images: int, batches: int, worker_counts: list[int]) -> None:
    import torch

    from negmerge.data import Manifest
    from negmerge.loading import (
        DecodedImages,
        TrainingImages,
        TrainPipeline,
        training_loader,
    )

    torch.set_num_threads(1)
    model = clip_like_model()
    with tempfile.TemporaryDirectory() as folder:
        manifest = Manifest.load(write_photos(Path(folder), n_images))
        samples = list(manifest.samples)
        pipeline = model.train_pipeline(AUGMENT)

        def measure(
            workers: int, decoded: DecodedImages | None, path: TrainPipeline
        ) -> tuple[float, float]:
            data = TrainingImages(manifest, samples, model.classes, path, seed=0, decoded=decoded)
            return rate(training_loader(data, BATCH, batches, workers, pin_memory=False), batches)

        # main's path: no resize before RandAugment, which then works at the decoded size
        _, before = measure(0, None, TrainPipeline(lambda image: image, pipeline.augment))
        began = time.perf_counter()
        decoded = DecodedImages.build(manifest, samples, pipeline.prepare, 2**31)
        decode_seconds = time.perf_counter() - began
        rows = []
        for cache, kept in (("off", None), ("on", decoded)):
            single = None
            for workers in worker_counts:
                startup, measured = measure(workers, kept, pipeline)
                single = measured if workers == 0 else single
                ideal = None if single is None else single * max(1, workers)
                rows.append((workers, cache, startup, measured, ideal))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"\nTraining data path, {INPUT_SIZE} px input, RandAugment {AUGMENT}, JPEG "
        f"{SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}, {n_images} images, {batches} batches of {BATCH}, "
        f"{cores} cores"
    )
    print(
        f"  main's path (augment at the decoded size, decode each time, 0 workers): "
        f"{before:7.1f} images/s"
    )
    print(
        f"  decoding and resizing the set once: {decode_seconds:.2f} s "
        f"({n_images / decode_seconds:.0f} images/s), {decoded.nbytes / 2**20:.1f} MiB kept"
    )
    header = [("workers", 7), ("cache", 5), ("1st batch", 9), ("images/s", 9), ("x main", 6)]
    header.append(("ideal", 9))
    print("  " + "  ".join(f"{name:>{width}}" for name, width in header) + "  /ideal")
    for workers, cache, startup, measured, ideal in rows:
        shown = f"{ideal:9.1f}  {measured / ideal:6.2f}" if ideal else f"{'':9}  {'':6}"
        print(
            f"  {workers:>7}  {cache:>5}  {startup:8.2f}s  {measured:9.1f}  "
            f"{measured / before:6.2f}  {shown}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="distinct images in the set")
    parser.add_argument("--batches", type=int, default=10, help=f"batches of {BATCH} per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    data_path_table(args.images, args.batches, args.workers)


if __name__ == "__main__":
    main()
