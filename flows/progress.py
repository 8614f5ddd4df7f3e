"""Progress reporting that stages can call without knowing who is watching.

The CLI installs a rich reporter; tests and deployments get the silent default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Reporter:
    @contextmanager
    def track(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda advance=1: None

    def log(self, message: str) -> None:
        pass


class RichReporter(Reporter):
    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=False,
        )

    def __enter__(self) -> "RichReporter":
        """One live display for the whole run: every tracked step becomes a bar in it."""
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextmanager
    def track(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        task = self.progress.add_task(description, total=total)
        try:
            yield lambda advance=1: self.progress.advance(task, advance)
        finally:
            state = self.progress.tasks[task]
            self.progress.update(task, completed=state.total or state.completed)
            if not self.console.is_terminal:
                # Without a terminal the live bars only appear at the very end: log each step as it ends.
                self.progress.console.print(f"{description}: {state.completed:g}/{state.total or 0:g} in {state.elapsed or 0:.0f} s")

    def log(self, message: str) -> None:
        self.progress.console.print(message)


_current: Reporter = Reporter()


def reporter() -> Reporter:
    return _current


def set_reporter(new: Reporter) -> Reporter:
    global _current
    previous, _current = _current, new
    return previous


@contextmanager
def use_reporter(new: Reporter) -> Iterator[Reporter]:
    """``new`` is the reporter while the block runs."""
    previous = set_reporter(new)
    try:
        yield new
    finally:
        set_reporter(previous)
