"""A progress display a person can follow: one line per stage as it starts and ends."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
"""Lines are never broken at the console's width: a path in a job's log or a piped output
stays whole (a terminal still wraps what it shows)."""


class Stage:
    """Context manager that prints ``▶ name`` on entry and ``✔ name  notes  (12.3 s)`` on exit."""

    def __init__(self, name: str, timings: dict[str, float] | None = None, key: str = ""):
        """``timings[key]`` gets the stage's seconds on exit, for reports and benchmarks."""
        self.name = name
        self.timings, self.key = timings, key
        self.notes: list[str] = []
        self.seconds = 0.0

    def __enter__(self) -> Stage:
        self.started = time.time()
        console.print(f"[bold cyan]▶[/] {self.name} ...")
        return self

    def note(self, text: str) -> None:
        self.notes.append(text)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.seconds = time.time() - self.started
        if self.timings is not None:
            self.timings[self.key or self.name] = round(self.seconds, 2)
        mark = "[bold green]✔[/]" if kind is None else "[bold red]✘[/]"
        detail = "; ".join(self.notes)
        console.print(f"{mark} {self.name}  {detail}  [dim]({self.seconds:.1f} s)[/]")
