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

storage_table: a job's peak artifact storage against n, for both merge storage modes
(NEGMERGE_MERGE_STORAGE), as multiples of the model's size. The fine-tuning stage's files are
made as the worker makes them (worker.merge_states), on a model of --model-mib MiB of fp32
weights with random task vectors: task-vectors keeps each variant's task vector until the
merge; running folds each into its worker's merge state (negmerge.merge.running: a new state
file beside the current one, then the task vector and the replaced state are deleted), the
variants going to --storage-workers workers in turn. The peak is the sum of the job's files
after every write, the merged vector's included.

compute_floor_table (CUDA only; skipped with a line saying so elsewhere): a variant's training
throughput (negmerge.finetune.finetune_task_vector, data path included) against the compute
floor, a plain PyTorch loop (forward, backward, AdamW step, bf16 autocast) over random
tensors already on the GPU, same model and batch; ViT-B/32 and ResNet-50, goal >= 0.85x.

grid_table (--tables grid; not run by default, minutes of CPU): the job's compute at equal
quality. Forget and retain accuracy of NegMerge against total fine-tuning steps, n in
--grid-n x steps per variant times --grid-factors, on bench/experiments.py's regimes (3: the
digits classifier forgets a class; 1: the partly pretrained tiny CLIP forgets a domain), with
the experiments' own helpers (fine_tune, run_method). Per seed and steps factor the largest n
is fine-tuned once and every smaller n merges a prefix of its variant list (the same variants,
seeds and task vectors a job with that n would train). The list is RandAugment M 1..10 x
N 1..3 in an interleaved order (GRID_AUGMENTS), so that every prefix spreads over the
strengths; the rows' ratios are against the full grid (largest n, factor 1), and the notes
name the cheapest grid within 1 point of it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def job_storage_peak(
    folder: Path, n: int, mode: str, workers: int, shapes: dict[str, tuple[int, ...]]
) -> tuple[int, float]:
    """Peak bytes of a job's files through fine-tuning and merge, and the merge's seconds."""
    import torch

    from negmerge.io import save_file
    from negmerge.merge.running import combine_states, fold_task_vector, write_merged
    from negmerge.merge.streaming import merge_files

    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, folder_bytes(folder))

    generator = torch.Generator().manual_seed(0)
    taus, heads = [], [None] * workers
    for k in range(n):
        tau = folder / f"variants/{k:03d}.safetensors"
        tau.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}, tau
        )
        sample()
        if mode == "task-vectors":
            taus.append(tau)
            continue
        w = k % workers
        state = folder / f"states/w{w}-{k:03d}.safetensors"
        state.parent.mkdir(parents=True, exist_ok=True)
        fold_task_vector("negmerge", None, tau, k, heads[w], state)
        sample()  # the worst moment: the new state beside the current one and the task vector
        tau.unlink()
        if heads[w] is not None:
            heads[w].unlink()
        heads[w] = state
    began = time.perf_counter()
    merged = folder / "merged.safetensors"
    if mode == "task-vectors":
        merge_files("negmerge", taus, merged)
    else:
        write_merged(combine_states([h for h in heads if h is not None]), merged)
    seconds = time.perf_counter() - began
    sample()
    return peak, seconds


def storage_table(model_mib: float, counts: list[int], workers: int) -> None:
    elements = int(model_mib * 2**20 / 4)
    # A few tensors of a transformer's shapes: matrices and a bias.
    width = 512
    rows_ = max(1, (elements - width) // width)
    shapes = {
        "blocks.0.weight": (rows_ // 2, width),
        "blocks.1.weight": (rows_ - rows_ // 2, width),
    }
    shapes["head.bias"] = (width,)
    model_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    print(
        f"\nPeak job storage (task vectors, merge states, merged vector), NegMerge, a "
        f"{model_bytes / 2**20:.1f} MiB fp32 model, {workers} workers (running)"
    )
    header = f"  {'n':>3}  {'mode':>12}  {'peak MiB':>9}  {'x model':>8}  {'merge s':>8}"
    print(header + "  vs task-vectors")
    for n in counts:
        baseline = None
        for mode in ("task-vectors", "running"):
            with tempfile.TemporaryDirectory() as folder:
                peak, seconds = job_storage_peak(Path(folder), n, mode, workers, shapes)
            baseline = baseline or peak
            print(
                f"  {n:>3}  {mode:>12}  {peak / 2**20:9.1f}  {peak / model_bytes:8.2f}  "
                f"{seconds:8.2f}  {peak / baseline:6.2f}"
            )


def compute_floor_table(steps_per_row: int) -> None:
    import torch

    if not torch.cuda.is_available():
        print("\nCompute floor: no CUDA device here; run this table on a GPU.")
        return
    from negmerge.data import Manifest
    from negmerge.finetune import finetune_task_vector
    from negmerge.loading import LoaderOptions
    from negmerge.models import ModelSpec, load_model
    from negmerge.variants import Variant

    device = "cuda"
    print(f"\nCompute floor, {torch.cuda.get_device_name()}, bf16 autocast, batch {FLOOR_BATCH}")
    header = f"  {'model':>10}  {'floor img/s':>11}  {'variant img/s':>13}  {'x floor':>7}"
    print(header + f"  {'GPU MiB':>8}")
    with tempfile.TemporaryDirectory() as folder:
        manifest = Manifest.load(write_photos(Path(folder), FLOOR_BATCH * 4))
        for name, spec in FLOOR_MODELS.items():
            model = load_model(ModelSpec(**spec), device)
            floor = floor_rate(model.module, device, steps_per_row)
            torch.cuda.reset_peak_memory_stats()
            rates: list[float] = []
            record = rates.append
            variant = Variant(
                optimizer="adamw",
                lr=1e-5,
                batch_size=FLOOR_BATCH,
                epochs=max(2, steps_per_row // 4),
            )
            finetune_task_vector(
                model,
                manifest,
                list(manifest.samples),
                variant,
                device,
                lambda _s, _t, _loss, rate, record=record: record(rate),
                LoaderOptions(),
            )
            measured = float(np.median(rates[len(rates) // 2 :])) if rates else float("nan")
            memory = torch.cuda.max_memory_allocated() / 2**20
            ratio = measured / floor
            print(f"  {name:>10}  {floor:11.0f}  {measured:13.0f}  {ratio:7.2f}  {memory:8.0f}")
            del model
            torch.cuda.empty_cache()


FLOOR_BATCH = 128
FLOOR_MODELS = {
    # Random weights (no download): the speed is the architecture's.
    "ViT-B/32": {"family": "open_clip", "architecture": "ViT-B-32", "classes": ["a", "b"]},
    "ResNet-50": {"family": "classifier", "architecture": "resnet50", "classes": ["a", "b"]},
}


def floor_rate(module, device: str, steps: int) -> float:
    """Images/s of a plain training loop over random tensors already on the GPU."""
    import torch

    images = torch.randn(FLOOR_BATCH, 3, INPUT_SIZE, INPUT_SIZE, device=device)
    labels = torch.randint(0, 2, (FLOOR_BATCH,), device=device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module.train()
    for step in range(steps + 3):
        if step == 3:  # warm-up done
            torch.cuda.synchronize()
            began = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            logits = module(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return steps * FLOOR_BATCH / (time.perf_counter() - began)


# ---- grid: the job's compute at equal quality -------------------------------------------------

# RandAugment M 1..10 x N 1..3 (the clip-paper preset's 30 strengths), ordered so that every
# prefix spreads over them: M in a stride order (any 5 consecutive cover 1..10 roughly evenly),
# N rotating, each (M, N) once. variants.py's product order is M-major, so a prefix of the
# preset's own list would hold only the mildest strengths.
GRID_M = [1, 6, 3, 8, 5, 10, 2, 7, 4, 9]
GRID_AUGMENTS = [f"rand-m{m}-n{(k + r) % 3 + 1}" for r in range(3) for k, m in enumerate(GRID_M)]
# Steps per variant at factor 1: the classifier-paper preset's middle length (5 epochs of the
# forget set; the preset has 3, 5 and 10), and the tiny-clip preset's 30 steps.
GRID_CLASSIFIER_EPOCHS = 5


def grid_variants(experiment: int, steps: int, n: int):
    from negmerge.variants import PRESETS, VariantGrid

    preset = "classifier-paper" if experiment == 3 else "tiny-clip"
    base = {**PRESETS[preset]["base"], "epochs": None, "steps": steps}
    return VariantGrid(base=base, grid={"augment": GRID_AUGMENTS[:n]})


def grid_base_steps(experiment: int, seed: int, work: Path) -> int:
    """Steps per variant at factor 1."""
    from bench.experiments import class_deletion_spec
    from negmerge.context import JobContext
    from negmerge.loading import steps_per_epoch
    from negmerge.variants import PRESETS

    if experiment == 1:
        return PRESETS["tiny-clip"]["base"]["steps"]
    spec = class_deletion_spec(seed, grid_variants(3, 1, 1))
    forget = len(JobContext.load(spec, work).splits["forget"])
    batch = PRESETS["classifier-paper"]["base"]["batch_size"]
    return GRID_CLASSIFIER_EPOCHS * steps_per_epoch(forget, batch)


def grid_runs(experiment: int, seed: int, counts: list[int], factor: float, work: Path) -> dict:
    """NegMerge's rows for every n of `counts`, from one fine-tuning of the largest n."""
    import dataclasses

    from bench.experiments import (
        class_deletion_spec,
        domain_deletion_spec,
        fine_tune,
        fresh_workdir,
        run_method,
    )

    steps = max(1, round(factor * grid_base_steps(experiment, seed, work)))
    largest = max(counts)
    variants = grid_variants(experiment, steps, largest)
    spec = (
        class_deletion_spec(seed, variants)
        if experiment == 3
        else domain_deletion_spec(seed, variants, work.parent)  # bench/experiments.py's CLIP
    )
    workdir = fresh_workdir(work / f"exp{experiment}-seed{seed}-x{factor:g}")
    ctx, original, _, seconds = fine_tune(spec, workdir)
    rows = {}
    for n in counts:
        prefix = spec.model_copy(update={"variants": grid_variants(experiment, steps, n)})
        row = run_method(
            dataclasses.replace(ctx, spec=prefix), original, "negmerge", {}, f"negmerge-n{n}"
        )
        rows[n] = {**row, "steps": n * steps, "finetune_seconds": seconds * n / largest}
    for path in workdir.glob("methods/*/model.safetensors"):
        path.unlink()  # measured already: saves disk
    return {"original": original.metrics, "steps_per_variant": steps, "rows": rows}


def grid_table(experiments: list[int], seeds: list[int], counts: list[int], factors: list[float]):
    import json
    import statistics

    from rich.console import Console
    from rich.table import Table

    from bench.experiments import ACCURACY_COLUMNS, TITLES, WORK, cell

    console = Console(width=None if sys.stdout.isatty() else 160)
    work = WORK / "grid"
    work.mkdir(parents=True, exist_ok=True)
    full = (max(counts), 1.0)
    results = {}
    for experiment in experiments:
        began = time.perf_counter()
        runs = {}  # (n, factor) -> the seeds' rows
        base_steps = {}
        for seed in seeds:
            for factor in factors:
                with console.status(f"grid: experiment {experiment}, seed {seed}, x{factor:g}"):
                    run = grid_runs(experiment, seed, counts, factor, work / "runs")
                base_steps[factor] = run["steps_per_variant"]
                for n, row in run["rows"].items():
                    runs.setdefault((n, factor), []).append(row)
        results[experiment] = {f"{n} x{f:g}": rows for (n, f), rows in runs.items()}
        (forget_name, forget_key), (retain_name, retain_key) = ACCURACY_COLUMNS[experiment]

        def mean(n: int, factor: float, key: str, runs: dict = runs) -> float:
            return statistics.fmean(row[key] for row in runs[(n, factor)])

        reference = {key: mean(*full, key) for key in (forget_key, retain_key, "steps")}
        table = Table(
            title=f"{TITLES[experiment]}: NegMerge against total fine-tuning steps",
            title_justify="left",
        )
        for header in [
            "n",
            "steps x",
            "total steps",
            "/ full",
            forget_name,
            "Δ forget",
            retain_name,
            "Δ retain",
            "Kept %",
            "λ",
            "within 1 pt",
        ]:
            table.add_column(header, justify="right")
        within = []
        for (n, factor), rows in sorted(runs.items(), key=lambda item: item[1][0]["steps"]):
            d_forget = mean(n, factor, forget_key) - reference[forget_key]
            d_retain = mean(n, factor, retain_key) - reference[retain_key]
            ok = d_forget <= 1.0 and d_retain >= -1.0
            if ok:
                within.append((rows[0]["steps"], n, factor))
            table.add_row(
                str(n),
                f"{factor:g}",
                str(rows[0]["steps"]),
                f"{rows[0]['steps'] / reference['steps']:.2f}",
                cell([r[forget_key] for r in rows], 1),
                f"{d_forget:+.1f}",
                cell([r[retain_key] for r in rows], 1),
                f"{d_retain:+.1f}",
                cell([r["kept"] for r in rows], 1),
                cell([r["lambda"] for r in rows], 2)
                + (" *" if any(r["at_upper_end"] for r in rows) else ""),
                "yes" if ok else "",
                style="bold" if (n, factor) == full else None,
            )
        console.print(table)
        cheapest = min(within)
        notes = [
            f"Seeds {', '.join(map(str, seeds))}: mean ± std over {len(seeds)} run(s); Δ "
            f"against the full grid (n = {full[0]}, steps x1, in bold), on the means.",
            "Steps per variant: "
            + ", ".join(f"x{f:g}: {s}" for f, s in sorted(base_steps.items()))
            + f"; the variants' augmentations: the first n of {', '.join(GRID_AUGMENTS[:5])}, "
            "... (GRID_AUGMENTS, interleaved: every prefix spreads over M 1..10 and N 1..3).",
            f"Per seed and steps factor the n = {full[0]} variants were fine-tuned once and each "
            "smaller n merges a prefix of them: the variants, seeds and task vectors a job with "
            "that n trains (variant seeds depend on the job seed and index only).",
            "Within 1 pt: forget accuracy at most 1 point above the full grid's and retain "
            "accuracy at most 1 point below it. Cheapest such grid: "
            f"n = {cheapest[1]}, steps x{cheapest[2]:g} ({cheapest[0]} total steps, "
            f"{cheapest[0] / reference['steps']:.2f}x the full grid's).",
            f"Fine-tuning the full grid took {mean(*full, 'finetune_seconds'):.1f} s per seed "
            f"here; experiment {experiment} in all {(time.perf_counter() - began) / 60:.1f} min.",
        ]
        for line in notes:
            console.print(f"  {line}", style="dim")
        console.print()
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="distinct images in the set")
    parser.add_argument("--batches", type=int, default=10, help=f"batches of {BATCH} per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["data-path", "storage", "compute-floor"],
        choices=["data-path", "storage", "compute-floor", "grid"],
    )
    parser.add_argument("--model-mib", type=float, default=8.0, help="storage: the model's size")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 30], help="storage: variants")
    parser.add_argument("--storage-workers", type=int, default=2, help="storage: workers")
    parser.add_argument("--floor-steps", type=int, default=20, help="compute floor: steps")
    parser.add_argument("--grid-experiments", type=int, nargs="+", default=[3], choices=[1, 3])
    parser.add_argument("--grid-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--grid-n", type=int, nargs="+", default=[5, 10, 20, 30])
    parser.add_argument("--grid-factors", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    args = parser.parse_args()
    if "data-path" in args.tables:
        data_path_table(args.images, args.batches, args.workers)
    if "storage" in args.tables:
        storage_table(args.model_mib, args.n, args.storage_workers)
    if "compute-floor" in args.tables:
        compute_floor_table(args.floor_steps)
    if "grid" in args.tables:
        if max(args.grid_n) > len(GRID_AUGMENTS) or 1.0 not in args.grid_factors:
            parser.error(f"--grid-n at most {len(GRID_AUGMENTS)}; --grid-factors must hold 1")
        import torch

        torch.set_num_threads(1)  # bench/experiments.py's THREADS_NOTE: one is faster here
        grid_table(args.grid_experiments, args.grid_seeds, args.grid_n, args.grid_factors)


if __name__ == "__main__":
    main()
