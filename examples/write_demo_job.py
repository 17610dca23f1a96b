"""Build the offline fixtures (once) and write a job for `negmerge unlearn` into FOLDER.

By default the paper's main experiment in miniature: a CLIP model that knows two image
domains (digits and generated shapes) forgets the shapes and keeps the digits. With
`--forget-class three`: the tiny digits classifier forgets the class "three" (README's job).

    python examples/write_demo_job.py var/demo && negmerge unlearn var/demo/job.yaml \\
        --workdir var/demo/run
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from negmerge.fixtures import ensure_tiny_classifier, ensure_tiny_clip
from negmerge.fixtures import log as fixtures_log
from negmerge.fixtures.jobs import DEMO_VARIANTS, forget_class_job, forget_domain_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--forget-class",
        metavar="LABEL",
        help="make the tiny digits classifier forget this class (zero ... nine) instead",
    )
    args = parser.parse_args()

    # Say so while a fixture is built (a minute, once), not when it is cached.
    logging.basicConfig(format="%(message)s...", level=logging.WARNING)
    fixtures_log.setLevel(logging.INFO)
    if args.forget_class:
        job = forget_class_job(ensure_tiny_classifier(), label=args.forget_class)
    else:
        job = forget_domain_job(ensure_tiny_clip(), forget="shapes", keep="digits")
        job["variants"] = DEMO_VARIANTS
    args.folder.mkdir(parents=True, exist_ok=True)
    (args.folder / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    print(f"wrote {args.folder / 'job.yaml'}")


if __name__ == "__main__":
    main()
