"""Fine-tuning cost benchmarks.

Section "linearized vs standard step cost": the time and memory of one fine-tuning step of the
linearized model (finetuning "linear": a torch.func.jvp forward, then backward through it)
against a standard step of the same model, batch and optimiser. The step is the one
negmerge.finetune runs (forward, cross-entropy, backward, gradient clipping, AdamW) on a batch
already in memory, so data loading is not part of it. Each (model, mode) runs in a process of
its own, so that the memory figure is that run's: the growth of peak resident memory over the
steps (CPU), or peak allocated memory (CUDA).

    .venv/bin/python bench/finetune_linear.py step-cost                 # tiny classifier, tiny CLIP
    .venv/bin/python bench/finetune_linear.py step-cost --vit-b-32      # and CLIP ViT-B/32's tower
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

# ---- linearized vs standard step cost ---------------------------------------------------------

STEP_COST_MODELS = ("tiny-classifier", "tiny-clip", "vit-b-32")


def step_cost_model(name: str, mode: str, device: str):
    """The model to time, as a job loads it (for ViT-B/32: random weights, the image tower and
    a random 10-class head, since only the shapes matter to the cost), and an input size."""
    from negmerge.models import ModelSpec, load_model

    if name == "tiny-classifier":
        from negmerge.fixtures import ensure_tiny_classifier
        from negmerge.fixtures.jobs import forget_class_job

        spec = ModelSpec(**forget_class_job(ensure_tiny_classifier())["model"])
        return load_model(spec, device, mode), spec.image_size
    if name == "tiny-clip":
        from negmerge.fixtures import ensure_tiny_clip
        from negmerge.fixtures.jobs import forget_domain_job

        spec = ModelSpec(**forget_domain_job(ensure_tiny_clip())["model"])
        model = load_model(spec, device, mode)
        size = model.module.visual.image_size
        return model, size if isinstance(size, int) else size[0]
    import open_clip

    from negmerge.linearize import linearize_model
    from negmerge.models.base import UnlearningModel
    from negmerge.models.open_clip import ZeroShotClassifier

    clip = open_clip.create_model("ViT-B-32", pretrained=None).to(device).eval()
    head = nn.functional.normalize(torch.randn(10, clip.visual.output_dim, device=device), dim=1)
    classifier = ZeroShotClassifier(clip.visual, head, 100.0)
    model = UnlearningModel(
        module=classifier,
        classes=[str(i) for i in range(10)],
        tau_keys=[key for key, _ in classifier.named_parameters()],
        eval_transform=lambda image: image,
        mean=(0.5, 0.5, 0.5),
        full_state=classifier.state_dict,
        linearized_part="visual",
    )
    if mode == "linear":
        linearize_model(model, {})
    return model, 224


def measure_step_cost(name: str, mode: str, batch: int, steps: int, device: str) -> dict:
    """ms per step (median of `steps`, after one warm-up step) and the step's memory."""
    torch.manual_seed(0)
    model, size = step_cost_model(name, mode, device)
    module = model.module.train()
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, len(model.classes), (batch,), device=device)
    parameters = model.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.1)
    loss_fn = nn.CrossEntropyLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step() -> None:
        with autocast:
            loss = loss_fn(module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up: allocator, optimiser state
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    if device.startswith("cuda"):
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the peak over the warmed-up process: what a step needs beyond that
        memory = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - resident) / 1024
    return {
        "model": name,
        "mode": mode,
        "batch": batch,
        "ms_per_step": 1000 * sorted(times)[len(times) // 2],
        "memory_mib": memory,
        "parameters": sum(p.numel() for p in parameters),
        "device": device,
    }


def step_cost(models: list[str], batch: int, steps: int, device: str) -> list[dict]:
    """Every (model, mode), each in a fresh process; prints the side-by-side table."""
    rows = []
    for name in models:
        for mode in ("standard", "linear"):
            command = [sys.executable, __file__, "step-cost-one", name, mode]
            command += ["--batch", str(batch), "--steps", str(steps), "--device", device]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(step_cost_table(rows))
    return rows


def step_cost_table(rows: list[dict]) -> str:
    lines = [
        "| model | params | batch | standard ms/step | linear ms/step | time ratio "
        "| standard MiB | linear MiB | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["mode"]): r for r in rows}
    for name in dict.fromkeys(r["model"] for r in rows):
        std, lin = by[(name, "standard")], by[(name, "linear")]
        ratio = lin["memory_mib"] / std["memory_mib"] if std["memory_mib"] > 0 else float("nan")
        lines.append(
            f"| {name} | {std['parameters'] / 1e6:.2f} M | {std['batch']} "
            f"| {std['ms_per_step']:.0f} | {lin['ms_per_step']:.0f} "
            f"| {lin['ms_per_step'] / std['ms_per_step']:.2f}x "
            f"| {std['memory_mib']:.0f} | {lin['memory_mib']:.0f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("step-cost", help="linearized vs standard step cost")
    cost.add_argument("--vit-b-32", action="store_true", help="also CLIP ViT-B/32's tower")
    one = commands.add_parser("step-cost-one")
    one.add_argument("model", choices=STEP_COST_MODELS)
    one.add_argument("mode", choices=("standard", "linear"))
    for sub in (cost, one):
        sub.add_argument("--batch", type=int, default=16)
        sub.add_argument("--steps", type=int, default=5)
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.command == "step-cost-one":
        print(
            json.dumps(
                measure_step_cost(args.model, args.mode, args.batch, args.steps, args.device)
            )
        )
        return
    models = ["tiny-classifier", "tiny-clip", *(["vit-b-32"] if args.vit_b_32 else [])]
    step_cost(models, args.batch, args.steps, args.device)


if __name__ == "__main__":
    main()
