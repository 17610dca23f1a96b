"""One unlearning job with 1 and with 2 worker processes (one thread each), side by side.

    .venv/bin/python bench/workers.py [--variants 6] [--epochs 40]

Runs on the embedded default (SQLite, Celery's filesystem transport) in a temporary folder,
with the tiny digits classifier: the API in this process, `celery worker --concurrency 1`
subprocesses (OMP_NUM_THREADS=1), and the watchdog as a thread. Both runs run
the identical job; the time is from submitting it to SUCCEEDED.

The work split is chosen to look like real use, not like a unit test. A real job fine-tunes
27-30 variants for minutes each, and its serial steps (prepare, merge, search, finalize) take
seconds to a minute: fine-tuning is well over 90% of it. The tiny classifier trains a default
2-epoch variant in a fraction of a second, so at that size the per-step fixed costs (a fresh
child process, the database, the broker) would be all the bench measures. Hence 40 epochs a
variant by default: a few seconds of training each, against serial steps of about a second.
The table prints every stage's time, so the split it ran with is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("prepare", "finetune", "merge", "search", "finalize")


def stage_times(steps: dict, wall: float) -> dict[str, float]:
    """Seconds of each stage from the job's step rows (claim to done); fine-tuning is the span
    from the first variant's start to the last one's end; `between` is what is left: messages
    in flight and fresh child processes between steps."""
    spans = {
        name: (s.finished_at - s.started_at).total_seconds()
        for name, s in steps.items()
        if not name.startswith("finetune:")
    }
    variants = [s for name, s in steps.items() if name.startswith("finetune:")]
    spans["finetune"] = (
        max(s.finished_at for s in variants) - min(s.started_at for s in variants)
    ).total_seconds()
    spans["between"] = wall - sum(spans[name] for name in STAGES)
    return spans


def step_costs(steps: dict, result: dict) -> dict[str, float]:
    """Per step: seconds the step took in its worker, and the part the library's own work
    took (the rest is the step's fixed cost: child start, database, loading the model)."""
    variants = [s for name, s in steps.items() if name.startswith("finetune:")]
    work = {
        "prepare": steps["prepare"].output["seconds"],
        "variant": sum(s.output["seconds"] for s in variants) / len(variants),
        "merge": steps["merge"].output["seconds"],
        "search": steps["search"].output["seconds"],
        "finalize": result["timings"]["evaluate_and_store"],
    }
    took = {
        name: (steps[name].finished_at - steps[name].started_at).total_seconds()
        for name in ("prepare", "merge", "search", "finalize")
    }
    took["variant"] = sum((s.finished_at - s.started_at).total_seconds() for s in variants) / len(
        variants
    )
    return {
        **{f"{k}_step": v for k, v in took.items()},
        **{f"{k}_work": v for k, v in work.items()},
    }


def run(workers: int, variants: int, epochs: int, folder: Path) -> dict:
    from alembic import command
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from negmerge.fixtures import default_cache_dir, ensure_tiny_classifier
    from tests.conftest import alembic_config
    from tests.worker.conftest import (
        WorkerProcess,
        job_steps,
        register_tenant,
        settings_env,
        submit,
        wait_for,
    )
    from worker.watchdog import start_thread

    classifier = ensure_tiny_classifier()
    settings = Settings(
        database_url=f"sqlite:///{folder / 'negmerge.db'}",
        broker_folder=str(folder / "broker"),
        artifact_root=str(folder / "artifacts"),
        data_roots=[str(default_cache_dir())],
        step_lease_seconds=30,
    )
    command.upgrade(alembic_config(settings.database_url), "head")
    env = settings_env(settings)
    processes = [WorkerProcess(env, folder / f"worker{i}.log", f"bench{i}") for i in range(workers)]
    _, stop = start_thread(settings)
    app = create_app(settings)
    try:
        for process in processes:
            process.wait_ready()
        with TestClient(app) as client:
            tenant = register_tenant(client, app.state.db, classifier)
            body = {
                "model": {"id": tenant.model_id, "version": 1},
                "forget": {"dataset_id": tenant.dataset_id, "classes": ["three"]},
                "variants": {
                    "base": {"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": epochs},
                    "grid": {"weight_decay": [1e-4 * (k + 1) for k in range(variants)]},
                },
                "max_eval_samples": 64,
            }
            began = time.perf_counter()
            job_id = submit(client, tenant, body)
            job = wait_for(client, tenant, job_id, timeout=1800)
            wall = time.perf_counter() - began
            assert job["state"] == "SUCCEEDED", job
            steps = job_steps(app.state.db, job_id)
            return {
                "wall": wall,
                "stages": stage_times(steps, wall),
                "steps": step_costs(steps, job["result"]),
                # None when lambda is 0 (no model version is made)
                "model_sha256": (job["result"]["model"] or {}).get("weights_sha256"),
            }
    finally:
        stop.set()
        for process in processes:
            process.stop()
        app.state.db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=40, help="Of each variant.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            runs[workers] = run(workers, args.variants, args.epochs, Path(folder))
    load = os.getloadavg()[0]
    print(
        f"one job, {args.variants} variants x {args.epochs} epochs, tiny digits classifier, "
        f"{os.cpu_count()} cores (load {load:.1f} after the runs)"
    )
    print(
        f"{'workers':>8} {'wall s':>7} {'speed-up':>9}"
        + "".join(f" {name:>9}" for name in (*STAGES, "between"))
    )
    for workers, result in runs.items():
        print(
            f"{workers:>8} {result['wall']:>7.1f} {runs[1]['wall'] / result['wall']:>8.2f}x"
            + "".join(f" {result['stages'][name]:>9.1f}" for name in (*STAGES, "between"))
        )
    print("per step (1 worker), seconds in the worker / of which the library's work:")
    costs = runs[1]["steps"]
    print(
        "  "
        + ", ".join(
            f"{name} {costs[f'{name}_step']:.2f}/{costs[f'{name}_work']:.2f}"
            for name in ("prepare", "variant", "merge", "search", "finalize")
        )
    )
    same = runs[1]["model_sha256"] == runs[2]["model_sha256"]
    print(f"same model from both runs: {same}")
    print(
        json.dumps(
            {str(k): {x: v[x] for x in ("wall", "stages", "steps")} for k, v in runs.items()}
        )
    )


if __name__ == "__main__":
    main()
