"""Progress display for long work: bytes, rate and ETA on a terminal, silent otherwise.

``rich`` is imported only when a bar is shown (stderr is a terminal and not
``quiet``): a command whose output goes to a pipe or a file never loads it.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class ByteProgress:
    """A byte counter shown as a bar when stderr is a terminal and not ``quiet``."""

    def __init__(self, description: str, total: int | None, *, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.done = 0
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
            )
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> ByteProgress:
        if self._progress:
            self._progress.start()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress:
            self._progress.stop()
