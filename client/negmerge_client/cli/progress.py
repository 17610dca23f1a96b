"""A job's progress on stderr while `negmerge-client jobs wait` polls it: a rich bar on a terminal
(stage, variants done/n, lambdas evaluated, percent), one line a change elsewhere (logs)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from negmerge_client.cli.output import console
from negmerge_client.client import JSON, TERMINAL_STATES


class JobProgress:
    def __init__(self) -> None:
        self._console = console(stderr=True)
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self._console,
            transient=False,
            disable=not self._console.is_terminal,
        )
        self._task: TaskID | None = None
        self._last: str | None = None

    def __enter__(self) -> JobProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, job: JSON) -> None:
        progress = job["progress"]
        description = job["state"] + (f" {job['stage']}" if job.get("stage") else "")
        detail = (
            f"variants {progress['variants_done']}/{progress['variants_total']}  "
            f"lambdas {progress['lambdas_evaluated']}"
        )
        if progress.get("current_loss") is not None:
            detail += f"  loss {progress['current_loss']:.3f}"
        if self._console.is_terminal:
            if self._task is None:
                self._task = self._bar.add_task(description, total=100, detail=detail)
            self._bar.update(
                self._task, description=description, completed=progress["percent"], detail=detail
            )
            return
        if job["state"] in TERMINAL_STATES:
            return  # the command's last line says how it ended
        line = f"{job['id']}  {description}  {progress['percent']:.0f}%  {detail}"
        if line != self._last:  # off a terminal, a line for each change, not for each poll
            self._console.print(line, soft_wrap=True)
            self._last = line
