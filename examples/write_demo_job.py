"""Build the offline fixtures (once) and write a job that makes the tiny CLIP forget a domain.

The paper's main experiment in miniature: a CLIP model that knows two image domains (digits
and generated shapes) forgets the shapes and keeps the digits.

    python examples/write_demo_job.py var/demo && negmerge unlearn var/demo/job.yaml \\
        --workdir var/demo/run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from negmerge.fixtures import ensure_tiny_clip
from negmerge.fixtures.jobs import DEMO_VARIANTS, forget_domain_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()

    print("building the offline fixtures (about a minute, once)...", flush=True)
    clip = ensure_tiny_clip()
    job = forget_domain_job(clip, forget="shapes", keep="digits")
    job["variants"] = DEMO_VARIANTS
    args.folder.mkdir(parents=True, exist_ok=True)
    (args.folder / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    print(f"wrote {args.folder / 'job.yaml'}")


if __name__ == "__main__":
    main()
