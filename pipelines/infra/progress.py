"""Progress lines for long steps: done / total, share, elapsed and time left.

Every long loop (composite blocks, training epochs, inference tile rows) reports through
one ``Progress``, which calls the stage's ``say`` (the Dagster run log in assets, so the
UI and the CLI's console both show it) about every tenth of the work and at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Report ``done/total`` with the time left, estimated from the rate so far."""

    def __init__(
        self,
        label: str,
        total: int,
        say: Callable[[str], None],
        unit: str = "",
        steps: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.say, self.unit = label, max(0, total), say, unit
        self.every = max(1, self.total // max(1, steps))
        self.clock = clock
        self.t0 = clock()
        self.lines: list[str] = []

    def __call__(self, done: int, note: str = "") -> None:
        if self.total == 0 or not (done == self.total or done % self.every == 0):
            return
        elapsed = self.clock() - self.t0
        left = elapsed / done * (self.total - done) if done else float("nan")
        unit = f" {self.unit}" if self.unit else ""
        line = (
            f"{self.label}: {done}/{self.total}{unit} ({100 * done / self.total:.0f} %), "
            f"{duration(elapsed)} elapsed"
            + (f", about {duration(left)} left" if done < self.total else "")
            + (f"; {note}" if note else "")
        )
        self.lines.append(line)
        self.say(line)
