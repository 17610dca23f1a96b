"""Write a small pretrained checkpoint and n fine-tuned variants of it, for trying the CLI.

Each variant moves the weights along one shared direction (what every fine-tuning run on the
forget set learns) plus its own noise (what depends on the run's hyperparameters), so the
sign-consensus merge has something to find.

    python examples/make_checkpoints.py var/demo --variants 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from negmerge.io import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--variants", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    pre = {
        "blocks.0.weight": torch.randn(256, 256, generator=gen) * 0.02,
        "blocks.0.bias": torch.zeros(256),
        "norm.running_mean": torch.zeros(256),
        "norm.num_batches_tracked": torch.tensor(0),
        "head.weight": torch.randn(10, 256, generator=gen) * 0.02,
    }
    shared = {
        k: torch.randn(v.shape, generator=gen) * 1e-3
        for k, v in pre.items()
        if v.is_floating_point()
    }
    args.folder.mkdir(parents=True, exist_ok=True)
    save_file(pre, args.folder / "pretrained.safetensors")
    for k in range(args.variants):
        variant = {}
        for key, value in pre.items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=gen) * 1.5e-3
                variant[key] = value + shared[key] + noise
            else:
                variant[key] = value + 100 * (k + 1)
        save_file(variant, args.folder / f"finetuned-{k}.safetensors")
    print(f"wrote {args.folder}/pretrained.safetensors and {args.variants} fine-tuned variants")


if __name__ == "__main__":
    main()
