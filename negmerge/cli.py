"""The `negmerge` command. The library's own subcommands live here; the service attaches its
subcommands (admin, serve) through the `negmerge.commands` entry-point group, so this module
never imports the service. Those are loaded only when named (or listed by --help),
and torch only by the commands that use it: `negmerge merge` runs without either, as importing
torch alone takes more memory than a checkpoint of ViT-B/32 size."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from negmerge.errors import NegMergeError
from negmerge.merge import METHODS
from negmerge.merge.streaming import merge_files

if TYPE_CHECKING:
    from negmerge.escalation import RoundSummary
    from negmerge.stage_outputs import Report
    from negmerge.verdict import Verdict

stderr = Console(stderr=True)
FILE = click.Path(dir_okay=False, path_type=Path)
# `negmerge unlearn` (and `negmerge-client jobs wait`) exit with this when the job ran to the
# end but its target was not met: not a success, and not an error in the input either.
EXIT_TARGET_NOT_MET = 5


class _Group(click.Group):
    """Turns the library's input errors into one readable line and a non-zero exit, and loads
    plugin commands when they are asked for."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except NegMergeError as exc:
            raise click.ClickException(str(exc)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_plugins()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in _plugins():
            self.add_command(_load_plugin(_plugins()[name]), name)
        return self.commands.get(name)


@click.group(cls=_Group)
@click.version_option(package_name="negmerge-service")
def main() -> None:
    """NegMerge: make an image model forget data by merging task vectors (arXiv 2410.05583)."""


@main.command()
@click.argument("checkpoints", nargs=-1, type=FILE)
@click.option(
    "--pretrained",
    type=FILE,
    help="The model the checkpoints were fine-tuned from. "
    "Without it, CHECKPOINTS are task-vector files.",
)
@click.option(
    "--method",
    type=click.Choice(sorted(METHODS)),
    default="negmerge",
    show_default=True,
    help="Merge method.",
)
@click.option("--consensus", type=float, help="negmerge: share of signs that must agree (0.5, 1].")
@click.option("--topk", type=float, help="ties: percent of each task vector kept by magnitude.")
@click.option("--index", type=int, help="single: which task vector to use (0-based).")
@click.option("--output", "-o", type=FILE, required=True, help="Merged task vector (safetensors).")
@click.option(
    "--sparse/--dense",
    default=None,
    help="Store the merged vector sparse (a bitmask and the kept values per tensor) or dense. "
    "Default: sparse unless the dense file would be smaller.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(
    checkpoints: tuple[Path, ...],
    pretrained: Path | None,
    method: str,
    consensus: float | None,
    topk: float | None,
    index: int | None,
    output: Path,
    sparse: bool | None,
    as_json: bool,
) -> None:
    """Merge the task vectors of fine-tuned CHECKPOINTS into one task vector.

    Streams one slice of one tensor at a time, so n checkpoints that do not fit in memory
    together merge fine.
    """
    if not checkpoints:
        raise click.UsageError("give at least one fine-tuned checkpoint (n = 0)")
    params = {
        name: value
        for name, value in (("consensus", consensus), ("topk", topk), ("index", index))
        if value is not None
    }
    with _byte_progress("merging") as on_progress:
        result = merge_files(
            method,
            checkpoints,
            output,
            pretrained=pretrained,
            params=params,
            on_progress=on_progress,
            layout={None: "auto", True: "sparse", False: "dense"}[sparse],
        )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"method        {result.method} {json.dumps(result.params)}")
    click.echo(f"task vectors  {result.n}")
    click.echo(f"kept          {result.kept_fraction:.2%} of elements")
    click.echo(f"time          {result.seconds:.2f} s")
    click.echo(f"output        {result.output}")
    share = result.output_bytes / max(result.dense_bytes, 1)
    click.echo(
        f"size          {_mib(result.output_bytes)} {result.layout} "
        f"({share:.1%} of {_mib(result.dense_bytes)} dense)"
    )


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.2f} MiB"


@main.command()
@click.option("--pretrained", type=FILE, required=True, help="The original model.")
@click.option("--vector", type=FILE, required=True, help="A (merged) task vector.")
@click.option("--scale", type=float, required=True, help="lambda in theta_pre - lambda * tau.")
@click.option("--output", "-o", type=FILE, required=True, help="The new model (safetensors).")
def apply(pretrained: Path, vector: Path, scale: float, output: Path) -> None:
    """Write the unlearned model theta_pre - SCALE * tau."""
    from negmerge.task_vector import subtract_task_vector_file  # torch: only this command needs it

    began = time.perf_counter()
    subtract_task_vector_file(pretrained, vector, scale, output)
    click.echo(f"wrote {output} (lambda = {scale}) in {time.perf_counter() - began:.2f} s")


@main.command()
@click.argument("job", type=FILE)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where the stages' outputs go; running again with the same folder resumes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def unlearn(job: Path, workdir: Path, as_json: bool) -> None:
    """Run the unlearning JOB (YAML or JSON) end to end: fine-tune the variants, merge, search
    lambda, evaluate, judge the result against the job's target, and write the unlearned model
    and report.json into WORKDIR. Exits 0 if the target was met, 5 if not (1 on an error)."""
    from negmerge.job_spec import JobSpec
    from negmerge.pipeline import run_unlearning
    from negmerge.stage_outputs import to_stored

    spec = JobSpec.from_file(job)
    with _JobProgress() as progress:
        report = run_unlearning(spec, workdir, progress)
    if as_json:
        click.echo(json.dumps(to_stored(report), indent=2))
    else:
        print_report_summary(report)
    if not report.verdict.met:
        raise SystemExit(EXIT_TARGET_NOT_MET)


def print_report_summary(report: Report) -> None:
    """The before/after table, lambda, kept fraction and hashes of a report."""
    from rich.table import Table

    console = Console()
    before, after = report.metrics.before, report.metrics.after
    table = Table(title="Unlearning result")
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    labels = {
        "forget_acc": "forget accuracy (Acc D_f)",
        "forget_test_acc": "forget test accuracy",
        "retain_acc": "retain accuracy (Acc D_r)",
        "test_acc": "test accuracy (Acc D_test)",
        "mia": "MIA-efficacy",
    }
    for key, label in labels.items():
        if before.get(key) is not None:
            table.add_row(label, f"{before[key]:.2f}", f"{after[key]:.2f}")
    console.print(table)
    search, merge = report.search, report.merge
    edge = "  (upper end of the grid: consider a wider grid)" if search.at_upper_end else ""
    kept = f"{merge.kept_fraction:.2%} of tau ({merge.method}, n = {merge.n})"
    click.echo(f"lambda        {report.lambda_:g}{edge}")
    click.echo(f"kept          {kept}")
    click.echo(f"base model    sha256 {report.base_model.sha256}")
    if report.model is not None:
        click.echo(f"new model     sha256 {report.model.sha256}")
        click.echo(f"              {report.model.path}")
    else:
        click.echo("new model     none: lambda 0 leaves the model unchanged")
    print_rounds(report.rounds)
    print_verdict(report.verdict)


def print_rounds(rounds: list[RoundSummary]) -> None:
    """One line a round, when escalation ran more than one (the result is the last one's)."""
    if len(rounds) < 2:
        return
    for summary in rounds:
        outcome = "met" if summary.verdict.met else "not met"
        click.echo(
            f"round {summary.round:<7} {len(summary.variants_merged)} variants merged, "
            f"kept {summary.kept_fraction:.2%}, lambda {summary.lambda_:g}: {outcome}"
        )


def print_verdict(verdict: Verdict) -> None:
    """The verdict: met or not, the target it was judged by, and every check."""
    bounds = verdict.target.model_dump().items()
    target = ", ".join(f"{k} {v:g}" for k, v in bounds if v is not None)
    default = f" (the default for {verdict.kind})" if verdict.default_target else ""
    click.echo(f"target        {target}{default}")
    head = "MET" if verdict.met else "NOT MET"
    click.echo(f"verdict       {head}: {verdict.reason.split(': ', 1)[-1]}")
    for check in verdict.checks:
        click.echo(f"              {'ok ' if check.met else 'NO '} {check.text}")


class _JobProgress:
    """Progress of a job on the terminal: the stage, a bar over all fine-tuning steps, and one
    over the lambdas evaluated."""

    def __init__(self) -> None:
        from rich.progress import MofNCompleteColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=stderr,
            disable=not stderr.is_terminal,
        )
        self._finetune = self._search = None

    def __enter__(self) -> _JobProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def stage(self, name: str) -> None:
        if stderr.is_terminal:
            stderr.log(f"stage: {name}")

    def variant_step(self, index: int, n: int, step: int, total: int, loss: float) -> None:
        if self._finetune is None:
            self._finetune = self._bar.add_task("fine-tuning", total=None, note="")
        note = f"variant {index + 1}/{n}  step {step}/{total}  loss {loss:.3f}"
        self._bar.update(self._finetune, note=note)
        if step == total:
            self._bar.update(self._finetune, completed=index + 1, total=n)

    def variant_done(self, index: int, n: int) -> None:
        if self._finetune is None:
            self._finetune = self._bar.add_task("fine-tuning", total=n, note="(resumed)")
        self._bar.update(self._finetune, completed=index + 1, total=n)

    def lambda_evaluated(self, lam: float, evaluation) -> None:
        if self._search is None:
            self._search = self._bar.add_task("lambda search", total=None, note="")
        e = evaluation
        note = f"lambda {lam:g}: forget {e.forget_acc:.1f}  retain {e.retain_acc:.1f}"
        self._bar.advance(self._search)
        self._bar.update(self._search, note=note)


@contextmanager
def _byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on stderr (only on a terminal); yields its update callback."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@functools.cache
def _plugins() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group="negmerge.commands")}


def _load_plugin(entry: EntryPoint) -> click.Command:
    try:
        return entry.load()
    except Exception as exc:  # a broken plugin must not take the library's commands down
        return _unavailable(entry.name, exc)


def _unavailable(name: str, error: Exception) -> click.Command:
    @click.command(
        name, help=f"(unavailable: {error})", context_settings={"ignore_unknown_options": True}
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"'{name}' is unavailable: {error}")

    return command
