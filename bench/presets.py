"""Do the tiny presets forget? The README quick start's and the demo's jobs, over forget
classes and job seeds, for the preset as it is and for the preset with escalation rounds,
side by side: verdicts, rounds, lambda and the metrics the verdict reads.

    .venv/bin/python bench/presets.py                          # every job, seeds 0 1 2
    .venv/bin/python bench/presets.py --jobs class --seeds 0   # the quick start's jobs only
    .venv/bin/python bench/presets.py --markdown               # a table for docs/RESULTS.md
    .venv/bin/python bench/presets.py --jobs class --classes three seven --seeds 0 \
        --fixture-seeds 0 1 2 3 --configs preset "preset, batch norm on batch statistics"
    .venv/bin/python bench/presets.py --jobs class --refine 0    # the search without refinement

The class jobs forget one digit of the tiny classifier (`tiny-classifier`, the quick start
forgets "three"); the domain job forgets the shapes domain of the tiny CLIP (`tiny-clip`,
`make demo`). Each row is a full job through `negmerge.pipeline.run_unlearning`, from a fresh
work directory, with the default search and the default target of its kind. With
--fixture-seeds the class jobs run on tiny classifiers trained from each of those seeds, so a
recipe is checked on several trainings, not tuned to one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from negmerge.fixtures import ensure_tiny_classifier, ensure_tiny_clip
from negmerge.fixtures.jobs import forget_class_job, forget_domain_job
from negmerge.job_spec import JobSpec
from negmerge.pipeline import run_unlearning

CLASSES = ("three", "seven", "one")
# The preset as it is (the baseline), and with escalation (each a full configuration).
# "variant_base" goes into the variants' base (Variant fields), the rest into the job.
CONFIGS = {
    "preset": {},
    "preset + 2 rounds more": {"escalation": {"rounds": 2, "strategy": "more"}},
    "preset + 2 rounds longer": {"escalation": {"rounds": 2, "strategy": "longer"}},
    # Before Variant.batch_norm: train-mode batch norm, on the forget set's batch statistics.
    "preset, batch norm on batch statistics": {"variant_base": {"batch_norm": "batch"}},
}
DEFAULT_CONFIGS = list(CONFIGS)[:3]


def jobs(which: list[str], classes: list[str], fixture_seeds: list[int]) -> list[tuple[str, dict]]:
    found = []
    if "class" in which:
        for fixture_seed in fixture_seeds:
            classifier = ensure_tiny_classifier(seed=fixture_seed)
            suffix = f" (classifier seed {fixture_seed})" if fixture_seeds != [0] else ""
            found += [(f"class {c}{suffix}", forget_class_job(classifier, c)) for c in classes]
    if "domain" in which:
        found.append(("domain shapes", forget_domain_job(ensure_tiny_clip())))
    return found


def run(job: dict, seed: int, config: dict, refine: int | None = None) -> dict:
    config = dict(config)
    if base := config.pop("variant_base", None):
        variants = job["variants"]
        config["variants"] = {**variants, "base": {**variants.get("base", {}), **base}}
    if refine is not None:
        config["search"] = {**job.get("search", {}), "refine": refine}
    spec = JobSpec.model_validate({**job, **config, "seed": seed})
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        report = run_unlearning(spec, workdir)
    after = report.metrics.after
    return {
        "met": report.verdict.met,
        "rounds": len(report.rounds),
        "lambda": report.lambda_,
        "forget": after["forget_acc"],
        "forget_test": after["forget_test_acc"],
        "retain": after["retain_acc"],
        "test": after["test_acc"],
        "seconds": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs", nargs="+", choices=["class", "domain"], default=["class", "domain"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="job seeds")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), help="class jobs' digits")
    parser.add_argument(
        "--fixture-seeds", nargs="+", type=int, default=[0], help="the tiny classifiers' seeds"
    )
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument(
        "--refine", type=int, help="search.refine, the boundary's bisections (default: 4)"
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: a second thread only contends on a shared machine

    rows = []
    for name, job in jobs(args.jobs, args.classes, args.fixture_seeds):
        for config in args.configs:
            runs = [run(job, seed, CONFIGS[config], args.refine) for seed in args.seeds]
            rows.append((name, config, runs))
            print(f"{name} / {config}: {sum(r['met'] for r in runs)}/{len(runs)} met", flush=True)

    headers = ["job", "configuration", "met", "rounds", "λ", "forget", "forget test", "retain",
               "test", "time (s)", "time / preset's"]  # fmt: skip
    base_time = {name: statistics.mean(r["seconds"] for r in runs)
                 for name, config, runs in rows if config == "preset"}  # fmt: skip

    def mean(runs: list[dict], key: str, digits: int = 1) -> str:
        values = [r[key] for r in runs if r[key] is not None]
        return f"{statistics.mean(values):.{digits}f}" if values else "-"

    lines = []
    for name, config, runs in rows:
        seconds = statistics.mean(r["seconds"] for r in runs)
        ratio = f"{seconds / base_time[name]:.2f}x" if name in base_time else "-"
        met = f"{sum(r['met'] for r in runs)}/{len(runs)}"
        lines.append([name, config, met, mean(runs, "rounds"), mean(runs, "lambda", 3),
                      mean(runs, "forget"), mean(runs, "forget_test"), mean(runs, "retain"),
                      mean(runs, "test"),
                      f"{seconds:.0f}", ratio])  # fmt: skip
    if args.markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "---|" * len(headers))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    table = Table(title=f"tiny presets, seeds {' '.join(map(str, args.seeds))} (means)")
    for header in headers:
        table.add_column(header, justify="left" if header in ("job", "configuration") else "right")
    for line in lines:
        table.add_row(*line)
    Console().print(table)


if __name__ == "__main__":
    main()
