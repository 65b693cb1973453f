"""How far a run is: rows done of the rows planned, errors, and per task what its kind counts.

The postprocess stage reports each batch's counts; ``bertpipe.engine.data`` gathers them in one small
Ray actor and the driver reads a ``Progress`` every second or so. Counts cover the rows this run
labelled (a resumed run counts only what it redid).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Progress:
    total: int  # rows planned (pre-flight counts)
    started: float = field(default_factory=time.time)  # wall clock: the counting actor may run elsewhere
    rows: int = 0
    errors: int = 0
    tasks: dict[str, Counter] = field(default_factory=dict)
    first_at: float | None = None  # when the first labelled rows came: start-up ends there
    first_rows: int = 0
    last_at: float | None = None

    def add(self, batch: dict) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at, self.first_rows = now, batch["rows"]
        self.last_at = now
        self.rows += batch["rows"]
        self.errors += batch["errors"]
        for task, counts in batch["tasks"].items():
            self.tasks.setdefault(task, Counter()).update(counts)

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(time.time() - self.started, 1e-9)

    @property
    def rows_per_s_after_first(self) -> float | None:
        """The rate once rows flow: rows after the first batch over the time since it came. On a small
        node start-up is a large share of a short job (13-29 s of a 200k-row job on 2 cores, by CPU), so
        this is the rate a longer job approaches, and the one the ETA uses."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return None
        return (self.rows - self.first_rows) / (self.last_at - self.first_at)

    @property
    def eta_s(self) -> float | None:
        rate = self.rows_per_s_after_first or self.rows_per_s
        return (self.total - self.rows) / rate if rate > 0 and self.rows else None

    def task_counts(self) -> dict[str, dict[str, int]]:
        """Per task, its counts most common first (labels, or entities by type)."""
        return {task: dict(counts.most_common()) for task, counts in self.tasks.items()}

    def line(self) -> str:
        """One plain progress line (cron logs and other non-terminals)."""
        share = f" ({100 * self.rows / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {format_seconds(self.eta_s)}" if self.eta_s is not None else ""
        return (
            f"rows {self.rows}/{self.total}{share}, {self.rows_per_s:.1f} rows/s{eta}, errors {self.errors}"
        )


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
