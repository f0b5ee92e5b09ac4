"""Run metrics: a JSONL log, TensorBoard event files, and the end-of-run report.

A run directory holds ``metrics.jsonl`` (one JSON object per record: ``step``, ``split`` and the
scalar values), ``tensorboard/`` (event files for ``tensorboard --logdir``) and, at the end,
``report.md`` with the final table and PNG plots of the curves. Only process 0 of a
multi-host run writes; the other processes get a logger with ``enabled=False``.

Resuming a run replays the steps after the restored checkpoint, so opening the log with
``resume_step`` first drops the records past that step: the log then reads as if the run had
never been interrupted.

In the test mode ``logging.example_ids``, ``examples/`` also records which examples every step
trained on (``ExampleLog``), truncated on resume the same way.

``progress_bar`` shows a phase's progress: a live bar on a terminal, plain lines in a file or
a job's log. Its ETA, like that of ``kdpipe run``'s view, comes from the recent updates
(``RecentRate``), so a slow first step (compilation) does not inflate it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn)
from rich.text import Text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILE = "report.md"
EXAMPLES_DIR = "examples"


def _scalar(value) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite the JSONL file ``path`` (if any) without its records of steps past ``step``."""
    if not path.exists():
        return
    kept = [r for r in _read_jsonl(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` in order (an empty list if there is none)."""
    return _read_jsonl(Path(run_dir) / METRICS_FILE)


class MetricsLogger:
    """Appends scalar records to ``metrics.jsonl`` and TensorBoard; a no-op when disabled."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True,
                 tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            _drop_records_after(path, resume_step)
        self._file = path.open("a")
        if tensorboard:
            # tensorboardX pulls in protobuf; import it only where event files are written.
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=resume_step)

    def log(self, step: int, values: Mapping[str, object], *, split: str = "train") -> dict:
        """Record ``values`` (scalars or 0-d arrays) at ``step``; returns the record written."""
        record = {"step": int(step), "split": split}
        record.update({k: _scalar(v) for k, v in values.items()})
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            for key, value in record.items():
                if self._tb is not None and key not in ("step", "split") and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{key}", value, int(step))
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ExampleLog:
    """Test mode (``logging.example_ids``): the examples each step of this host trained on.

    One JSONL file per host and group size, ``examples/host-<index>-of-<count>.jsonl``, one
    record per step: ``step``, ``offsets`` (the global sample offsets of the host's rows) and
    ``rows`` (the dataset rows they map to). Opened at ``resume_step`` (the restored checkpoint's
    step, 0 for a fresh start), the records past it are dropped first: the steps after a
    checkpoint are replayed on resume, so the files then list exactly the examples the saved
    state learnt from, whatever hosts came and went.

    Each host truncates its own file; process 0 also truncates the files of other group sizes
    (the hosts of an earlier layout are gone). No host truncates a file another live host
    writes, so no ordering between the hosts is needed.
    """

    def __init__(self, run_dir: str | os.PathLike, host_index: int, host_count: int,
                 resume_step: int):
        directory = Path(run_dir) / EXAMPLES_DIR
        directory.mkdir(parents=True, exist_ok=True)
        own = directory / f"host-{host_index}-of-{host_count}.jsonl"
        stale = [own] + ([p for p in directory.glob("host-*-of-*.jsonl")
                          if not p.name.endswith(f"-of-{host_count}.jsonl")] if host_index == 0 else [])
        for path in stale:
            _drop_records_after(path, resume_step)
        self._file = own.open("a")

    def log(self, step: int, offsets, rows) -> None:
        record = {"step": int(step), "offsets": [int(o) for o in offsets], "rows": [int(r) for r in rows]}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_example_logs(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of every host's ``examples/`` file (``ExampleLog``), with its ``file``."""
    return [{**record, "file": path.name}
            for path in sorted((Path(run_dir) / EXAMPLES_DIR).glob("host-*-of-*.jsonl"))
            for record in _read_jsonl(path)]


# Rates (and so ETAs) are measured over this many recent updates. The first update of a phase
# includes loading and compiling; it stops counting as soon as a second one arrives.
RATE_WINDOW = 20
# Without a terminal, progress_bar prints a plain line this often (logging.progress_every_s).
PROGRESS_EVERY_S = 10.0


class RecentRate:
    """The rate of a growing count over its last ``window`` updates, and the time left.

    With (t_0, c_0) .. (t_n, c_n) the last ``window`` + 1 updates that changed the count,
    ``rate = (c_n - c_0) / (t_n - t_0)`` and ``seconds_left(total) = (total - c_n) * (now -
    t_0) / (c_n - c_0)``: the time since the last update counts, so a phase that stalls (a
    student waiting for shards, an evaluation) sees its ETA grow rather than reach 0. Before
    two updates there is no rate: the first one ends the phase's start-up (loading,
    compilation), which says nothing of its speed. A count that goes back (a restart from an
    earlier checkpoint) starts the window over.

    rich's ``Task.speed`` keeps the updates of the last ``speed_estimate_period`` seconds, so
    a phase that updates less often than that has no estimate at all; tqdm's exponential
    average keeps a long first step in its estimate for dozens of updates.
    """

    def __init__(self, *, window: int = RATE_WINDOW, clock: Callable[[], float] = time.monotonic):
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=window + 1)
        self._clock = clock

    def update(self, completed: float) -> None:
        """Note the count ``completed`` now (an unchanged count is not a sample)."""
        if self._samples and completed == self._samples[-1][1]:
            return
        if self._samples and completed < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((self._clock(), completed))

    @property
    def rate(self) -> float | None:
        """Units per second over the window; None before two updates."""
        if len(self._samples) < 2:
            return None
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else None

    def seconds_left(self, total: float) -> float | None:
        """Seconds until the count reaches ``total`` at the rate over the window up to now (0
        once it has); None while there is no rate."""
        if self._samples and self._samples[-1][1] >= total:
            return 0.0
        if not self.rate:
            return None
        (first_time, first_count), (_, last_count) = self._samples[0], self._samples[-1]
        return (total - last_count) * (self._clock() - first_time) / (last_count - first_count)


def format_seconds(seconds: float | None) -> str:
    """``"1,234 s"``, or ``"-"`` for no estimate."""
    return "-" if seconds is None else f"{seconds:,.0f} s"


def progress_bar(label: str, *, enabled: bool = True, unit: str = "steps",
                 every_s: float = PROGRESS_EVERY_S, console=None,
                 get_time: Callable[[], float] | None = None) -> Progress:
    """A progress display (rich): label, done/total ``unit``, a free-text ``status`` field,
    elapsed time and an ETA from the recent updates (``RecentRate``). On a terminal it is a
    live bar; otherwise (output to a file, a Ray job's log) it prints a plain line, with
    done/total, rate and ETA, at the start, every ``every_s`` seconds and at the end.

    Use as a context manager; ``add_task(label, total=..., completed=..., status="")`` then
    ``update(task, advance=1, status=...)``. ``console``: a ``rich.console.Console`` (default:
    rich's, on stdout); ``get_time``: the clock (default: monotonic)."""
    return _Progress(label, unit, every_s, console=console, get_time=get_time,
                     disable=not enabled)


class _EtaColumn(ProgressColumn):
    """``ETA 12 s`` from the task's ``RecentRate``."""

    def __init__(self, rates: dict):
        super().__init__()
        self._rates = rates

    def render(self, task) -> Text:
        return Text(f"ETA {format_seconds(self._rates[task.id].seconds_left(task.total))}",
                    style="progress.remaining")


class _Progress(Progress):
    """rich's Progress with our ETA, and plain lines where a live bar would not show."""

    def __init__(self, label: str, unit: str, every_s: float, **kwargs):
        self._label, self._unit, self._every_s = label, unit, every_s
        self._rates: dict = {}
        self._stop_lines: threading.Event | None = None
        self._lines_thread: threading.Thread | None = None
        super().__init__(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                         TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                         _EtaColumn(self._rates), **kwargs)

    @property
    def _plain(self) -> bool:
        # rich's Live shows nothing on these until it stops
        console = self.console
        return not console.is_jupyter and (not console.is_terminal or console.is_dumb_terminal)

    def add_task(self, description: str, *args, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        self._rates[task_id] = RecentRate(clock=self.get_time)
        if self._stop_lines is not None:
            self._print_lines([task_id])
        return task_id

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        with self._lock:
            self._rates[task_id].update(self._tasks[task_id].completed)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        with self._lock:
            self._rates[task_id].update(self._tasks[task_id].completed)

    def status_line(self, task_id) -> str:
        """The task's plain line: done/total, rate and ETA from the recent updates, elapsed
        time and status."""
        with self._lock:
            task = self._tasks[task_id]
            rates = self._rates[task_id]
            rate = rates.rate
            done = f"{task.completed:,.0f}/{task.total:,.0f} {self._unit}"
            parts = [f"{self._label}: {done} ({task.percentage:.0f}%)",
                     f"{'-' if rate is None else f'{rate:,.2f}'} {self._unit}/s",
                     f"ETA {format_seconds(rates.seconds_left(task.total))}",
                     f"{task.elapsed or 0.0:,.0f} s elapsed"]
            status = task.fields.get("status")
            return ", ".join(parts + ([str(status)] if status else []))

    def _print_lines(self, task_ids=None) -> None:
        with self._lock:
            for task_id in self.task_ids if task_ids is None else task_ids:
                self.console.print(self.status_line(task_id), markup=False, highlight=False,
                                   soft_wrap=True)

    def _print_every(self, stop: threading.Event) -> None:
        while not stop.wait(self._every_s):
            self._print_lines()

    def start(self) -> None:
        if self.disable or not self._plain:
            super().start()
            return
        self._stop_lines = threading.Event()
        self._print_lines()
        self._lines_thread = threading.Thread(target=self._print_every, args=(self._stop_lines,),
                                              daemon=True, name=f"kdpipe-progress-{self._label}")
        self._lines_thread.start()

    def stop(self) -> None:
        if self._stop_lines is None:
            super().stop()
            return
        self._stop_lines.set()
        self._lines_thread.join()
        self._stop_lines = self._lines_thread = None
        self._print_lines()


def table_cell(value) -> str:
    """A report table's cell: floats to 4 significant digits, ``None`` (not measured) as "—"."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(table_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _plot(runs: Mapping[str, Sequence[dict]], split: str, keys: Sequence[str], path: Path,
          title: str) -> bool:
    """One panel per key with one line per run; False (nothing written) if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}
    for key in keys:
        lines = {name: [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
                 for name, records in runs.items()}
        lines = {name: points for name, points in lines.items() if points}
        if lines:
            panels[key] = lines
    if not panels:
        return False
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one color per run in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (key, lines) in zip(axes[0], panels.items()):
        for name, points in lines.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name,
                    color=colors[name])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(run_dir: str | os.PathLike, title: str,
                 final_rows: Sequence[Mapping[str, object]], *,
                 notes: Sequence[str] = (),
                 runs: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write ``run_dir/report.md``: ``final_rows`` as a table, ``notes`` as bullets, and plots
    of the train and eval curves (``train_curves.png``, ``eval_curves.png``) of the
    ``metrics.jsonl`` of ``run_dir``, or of each named run directory in ``runs`` side by side."""
    run_dir = Path(run_dir)
    sources = {"": run_dir} if runs is None else runs
    records = {name: read_metrics(path) for name, path in sources.items()}
    parts = [f"# {title}", "", _markdown_table(final_rows), ""]
    parts += [f"- {note}" for note in notes]
    plots = (("train", ("loss", "kl_loss", "ce_loss", "tokens_per_s", "mfu"), "train_curves.png"),
             ("eval", ("ce_loss", "kl_loss", "top1_agreement"), "eval_curves.png"),
             # train.on_policy (pipeline.onpolicy): the student's samples and the time split
             ("train", ("rollout_reverse_kl", "rollout_length", "rollout_eos_fraction",
                        "rollout_tokens_per_s"), "onpolicy_curves.png"),
             ("train", ("rollout_s", "score_s", "step_s"), "onpolicy_time.png"))
    for split, keys, name in plots:
        title = name.removesuffix(".png").replace("_", " ")  # "train curves", "onpolicy time"
        if _plot(records, split, keys, run_dir / name, title):
            parts += ["", f"![{title}]({name})"]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(parts) + "\n")
    return path
