"""The progress view of ``kdpipe run``: both host groups in one rich table."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from pipeline.metrics import PROGRESS_EVERY_S, RecentRate, format_seconds

if TYPE_CHECKING:
    from actors.student_group import StudentRestart


class ProgressView:
    """Both groups in one table (rich): shards written, tokens/s, student step, loss, ETA.

    On a terminal it is a live table; otherwise (a Ray job's log) one line every ``every_s``
    seconds (``logging.progress_every_s``) and at the end. The ETAs come from the recent
    shards and steps (``pipeline.metrics.RecentRate``), not from the start, which holds the
    start-up and the compilation.
    """

    def __init__(self, console, *, source: str, steps: int, start_step: int,
                 shards_total: Mapping[str, int], shards_done: Mapping[str, int],
                 teacher_hosts: int, student_hosts: int, every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.console, self.source, self.steps, self.start_step = console, source, steps, start_step
        self.shards_total, self.shards_done = dict(shards_total), dict(shards_done)
        self.teacher_hosts, self.student_hosts = teacher_hosts, student_hosts
        self.every_s, self._clock = every_s, clock
        self._shard_rate, self._step_rate = RecentRate(clock=clock), RecentRate(clock=clock)
        # The step the student group started from; it reports it before compiling, so the
        # step rate starts at the first step past it.
        self._first_step: int | None = None
        self.started = clock()
        self.fill_started: float | None = None  # set by the driver at the first shard it hands out
        self.fill_ended: float | None = None
        self.tokens_written = 0
        self.teacher_state = "-" if teacher_hosts == 0 else "starting"
        self.students: dict[int, dict] = {}
        self.restarts: list[str] = []
        self._live = None
        self._last_line: float | None = None

    def shard_written(self, split: str, tokens: int) -> None:
        self.fill_ended = self._clock()
        self.shards_done[split] = self.shards_done.get(split, 0) + 1
        self.tokens_written += tokens
        self._shard_rate.update(sum(self.shards_done.values()))

    def student_restarted(self, restart: StudentRestart) -> None:
        """The student group was re-formed: its size, and a line for the record."""
        self.students, self.student_hosts = {}, restart.hosts_after
        self._step_rate, self._first_step = RecentRate(clock=self._clock), None
        self.restarts.append(f"{restart.reason}: {restart.hosts_before} -> {restart.hosts_after} "
                             f"hosts from step {restart.resumed_step}")
        self.console.print(f"student group re-formed after a {self.restarts[-1]}\n"
                           + textwrap.indent(restart.detail, "  "))

    def _rows(self) -> list[tuple[str, ...]]:
        now = self._clock()
        shards = "  ".join(f"{s} {self.shards_done.get(s, 0)}/{n}" for s, n in self.shards_total.items())
        done = sum(self.shards_done.values()) - sum(self._initial_done.values())
        todo = sum(self.shards_total.values()) - sum(self._initial_done.values())
        if self.fill_started is None:
            fill_s = 0.0
        else:
            fill_s = (now if done < todo else self.fill_ended) - self.fill_started
        teacher = ("teacher", str(self.teacher_hosts), shards or "-",
                   f"{self.tokens_written / fill_s:,.0f} tok/s" if fill_s else "-",
                   self.teacher_state,
                   format_seconds(self._shard_rate.seconds_left(sum(self.shards_total.values())))
                   if todo else "-")
        lead = self.students.get(0, {})
        step = lead.get("step", self.start_step)
        waiting = sorted({s["waiting"] for s in self.students.values() if s.get("waiting")})
        detail = ("waiting for " + ", ".join(waiting)) if waiting else (
            f"loss {lead['loss']:.4f}" if "loss" in lead else "starting")
        if self.restarts:
            detail += f"  (re-formed {len(self.restarts)}x, last: {self.restarts[-1]})"
        student = ("student", str(self.student_hosts), f"step {step}/{self.steps}",
                   f"{lead['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in lead else "-",
                   detail, format_seconds(self._step_rate.seconds_left(self.steps)))
        return [teacher, student]

    def _table(self):
        from rich.table import Table

        table = Table(title=f"kdpipe run ({self.source} teacher)  {self._clock() - self.started:,.0f} s")
        for column in ("group", "hosts", "progress", "throughput", "status", "ETA"):
            table.add_column(column, justify="left" if column in ("group", "status") else "right")
        for row in self._rows():
            table.add_row(*row)
        return table

    def __enter__(self) -> "ProgressView":
        from rich.live import Live

        self._initial_done = dict(self.shards_done)
        if self.console.is_terminal:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def refresh(self, students: Mapping[int, dict] | None = None, *, final: bool = False) -> None:
        if students:
            self.students.update(students)
            step = self.students.get(0, {}).get("step")
            if self._first_step is None:
                self._first_step = step
            elif step is not None and step != self._first_step:
                self._step_rate.update(step)
        if self._live is not None:
            self._live.update(self._table())
        elif final or self._last_line is None or self._clock() - self._last_line >= self.every_s:
            self._last_line = self._clock()
            self.console.print(" | ".join("  ".join(row) for row in self._rows()), soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)
