"""Progress without a terminal (plain lines, an ETA from recent updates), and a teacher whose
outputs are not finite refused by the cache fill (through ``kdpipe cache``)."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import time

import numpy as np
import pytest
from rich.console import Console

from pipeline import metrics

from tiny_run import TINY, make_tiny_run


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    return console, out


def _step_durations(seed: int, steps: int) -> np.ndarray:
    """A 60 s first step (compilation), then steps of 0.3-0.7 s."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[60.0], rng.uniform(0.3, 0.7, steps - 1)])


# ---- the rate and ETA estimate ---------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_recent_rate_ignores_a_slow_first_step(seed):
    """After a 60 s first step and fast ones, the ETA is the remaining steps at the mean
    duration of the last ``window`` steps and the time since the last one (computed here
    from the durations, in float64); the whole-run average would be far off."""
    total, window = 200, 8
    durations = _step_durations(seed, 60)
    clock = FakeClock()
    rate = metrics.RecentRate(window=window, clock=clock)
    assert rate.rate is None and rate.seconds_left(total) is None
    for done, duration in enumerate(durations, start=1):
        clock.now += duration
        rate.update(done)
        if done == 1:
            assert rate.rate is None and rate.seconds_left(total) is None  # one update: no rate
            continue
        recent = durations[1:done][-window:]  # the first step never counts
        want_rate = len(recent) / recent.sum()
        assert rate.rate == pytest.approx(want_rate, rel=1e-9)
        assert rate.seconds_left(total) == pytest.approx((total - done) / want_rate, rel=1e-9)
        since = 4 * duration  # a stall: the time since the last step counts
        clock.now += since
        assert rate.seconds_left(total) == pytest.approx(
            (total - done) * (recent.sum() + since) / len(recent), rel=1e-9)
        clock.now -= since
    whole_run = (total - len(durations)) * durations.sum() / len(durations)
    assert whole_run > 2 * rate.seconds_left(total)
    assert rate.seconds_left(len(durations)) == 0.0


def test_recent_rate_starts_over_when_the_count_goes_back():
    """A student group restored from an earlier checkpoint: its steps before the restart do
    not count."""
    clock = FakeClock()
    rate = metrics.RecentRate(window=4, clock=clock)
    for step in range(1, 11):
        clock.now += 1.0
        rate.update(step)
    clock.now += 30.0
    rate.update(6)  # restored at step 6
    assert rate.rate is None
    clock.now += 2.0
    rate.update(7)
    assert rate.rate == pytest.approx(0.5)
    rate.update(7)  # an update without progress is not a sample
    clock.now += 2.0
    rate.update(8)
    assert rate.rate == pytest.approx(0.5)


# ---- progress_bar without a terminal ----------------------------------------------------------

LINE = re.compile(r"^cache train: (\d+)/20 sequences \(\d+%\), (-|[\d.,]+) sequences/s, "
                  r"ETA (-|[\d,]+ s), [\d,]+ s elapsed(, .*)?$")


def test_progress_bar_prints_plain_lines_without_a_terminal():
    """A 2 s phase with a line every 0.4 s: lines at the start, the end and in between, each
    with done/total, rate and ETA; no bar, no control codes."""
    console, out = _plain_console()
    with metrics.progress_bar("cache train", unit="sequences", every_s=0.4, console=console) as bar:
        task = bar.add_task("train", total=20, status="0 shards done before")
        for _ in range(20):
            time.sleep(0.1)
            bar.update(task, advance=1)
    lines = out.getvalue().splitlines()
    assert lines and all(LINE.match(line) for line in lines), out.getvalue()
    done = [int(LINE.match(line).group(1)) for line in lines]
    assert done[0] == 0 and done[-1] == 20 and done == sorted(done)
    assert len(lines) >= 4, lines  # start, end and at least two in between
    assert any(0 < d < 20 for d in done)
    assert lines[-1].endswith(", 0 shards done before") and "ETA 0 s" in lines[-1]


def test_progress_bar_eta_follows_the_recent_steps():
    """The line's ETA and rate come from the recent steps, not from the slow first one."""
    clock = FakeClock()
    console, out = _plain_console()
    durations = _step_durations(2, 30)
    bar = metrics.progress_bar("train", console=console, get_time=clock, every_s=3600)
    task = bar.add_task("train", total=100, status="")
    with bar:
        for duration in durations:
            clock.now += duration
            bar.update(task, advance=1)
        line = bar.status_line(task)
    recent = durations[1:][-20:]
    want_eta = (100 - len(durations)) * recent.mean()
    assert f"ETA {want_eta:,.0f} s" in line, line
    assert f"{1 / recent.mean():,.2f} steps/s" in line, line


def test_progress_bar_disabled_prints_nothing():
    console, out = _plain_console()
    with metrics.progress_bar("train", enabled=False, console=console, every_s=0.01) as bar:
        task = bar.add_task("train", total=3, status="")
        for _ in range(3):
            time.sleep(0.02)
            bar.update(task, advance=1)
    assert out.getvalue() == ""


def test_driver_view_eta_follows_the_recent_steps():
    """kdpipe run's view without a terminal: its student ETA comes from the steps after the
    first (which holds the compilation), although the students report step 0 before it."""
    from actors.view import ProgressView

    clock = FakeClock()
    console, out = _plain_console()
    durations = _step_durations(3, 12)
    view = ProgressView(console, source="live", steps=100, start_step=0, shards_total={},
                        shards_done={}, teacher_hosts=0, student_hosts=1, every_s=3600.0,
                        clock=clock)
    with view:
        view.refresh({0: {"step": 0}})
        for step, duration in enumerate(durations, start=1):
            clock.now += duration
            view.refresh({0: {"step": step, "loss": 1.0}})
        view.refresh(final=True)
    recent = durations[1:]
    want_eta = (100 - len(durations)) * recent.mean()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first refresh and the final one
    assert lines[-1].endswith(f"{want_eta:,.0f} s"), lines[-1]


# ---- the fill refuses non-finite teacher outputs ---------------------------------------------

def test_first_nonfinite_matches_numpy():
    """The writer's device check against a float64 numpy reference on random logits with
    NaN and inf planted at random (and none); one shape, so one compilation."""
    from pipeline.cache.writer import first_nonfinite

    rng = np.random.default_rng(0)
    batch, seq, vocab = 3, 5, 7
    for trial in range(16):
        logits = rng.standard_normal((batch, seq, vocab)).astype(np.float32)
        for _ in range(trial % 4):  # 0..3 planted values
            value = rng.choice([np.nan, np.inf, -np.inf])
            logits[rng.integers(batch), rng.integers(seq), rng.integers(vocab)] = value
        reference = logits.astype(np.float64)
        bad = ~np.isfinite(reference).all(axis=-1)  # [B, L]
        got = np.asarray(first_nonfinite(logits))
        if not bad.any():
            assert got[0] == -1, trial
            continue
        b, l = np.argwhere(bad)[0]  # row-major: the first sequence, then the first position
        assert got[0] == b * seq + l, trial
        assert bool(got[1]) == bool(np.isnan(reference[b, l]).any()), trial


SHARD = 16  # configs/tiny-test.yaml's cache.shard_sequences


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run's data, and an untied teacher: a NaN in one row of its embedding reaches
    only the sequences holding that token."""
    from pipeline.config import load_config
    from pipeline.data import read_info
    from pipeline.models.build import build_model
    from pipeline.models.hf_io import save_pretrained
    from pipeline.models.sharding import make_mesh

    work = tmp_path_factory.mktemp("fill")
    overrides = make_tiny_run(work)[:2]  # the tokenizer and the data, not the tied teacher
    config = load_config(TINY, overrides)
    spec = dataclasses.replace(config.model.teacher, path=None, tie_word_embeddings=False)
    vocab = read_info(config.data.prepared_dir).vocab_size
    save_pretrained(build_model(spec, vocab, 1, make_mesh()), work / "untied")
    return work, overrides


def _teacher_with_nan(tiny, name: str, tensor: str, index: tuple[int, ...]):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    work, _ = tiny
    path = work / name
    shutil.copytree(work / "untied", path)
    weights = path / "model.safetensors"
    with safe_open(str(weights), "np") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[tensor] = tensors[tensor].copy()
    tensors[tensor][index] = np.nan
    save_file(tensors, str(weights), metadata=metadata)
    return path


def _cache_args(tiny, teacher, cache):
    work, overrides = tiny
    return ["cache", TINY, *[a for o in overrides for a in ("--set", o)],
            "--set", f"model.teacher={{path: {teacher}}}", "--set", f"cache.path={cache}",
            "--split", "train"]


def _committed(cache) -> set[int]:
    from pipeline.cache import read_manifest

    return set(read_manifest(f"{cache}/train").committed)


def test_cache_refuses_a_teacher_with_a_nan_projection(tiny, tmp_path, cli):
    """One element of one projection is NaN: every sequence's logits are NaN from the first
    position on. Exit 2, the split and the first sequence named, no shard committed."""
    teacher = _teacher_with_nan(tiny, "nan-q", "model.layers.0.self_attn.q_proj.weight", (0, 0))
    cache = tmp_path / "cache"
    code, out, err = cli(_cache_args(tiny, teacher, cache), tmp_path)
    assert code == 2, err
    message = " ".join(err.split())
    assert message.startswith("kdpipe cache: error: teacher logits hold NaN at split train, "
                              "sequence 0, position 0"), err
    assert "Traceback" not in err and "\n\n" not in err.strip()  # one paragraph
    assert _committed(cache) == set()
    assert out.startswith("cache train: 0/")  # progress, as plain lines: stdout is no terminal


def test_cache_keeps_the_shards_before_the_first_nan_sequence(tiny, tmp_path, cli):
    """A NaN in the embedding row of a token that first appears in a later shard: the
    shards before it are committed, that shard is not, and the message names the first
    sequence holding the token and the first position where its logits (computed here
    directly, checked with numpy) are not finite."""
    from pipeline.config import load_config
    from pipeline.data import TokenDataset
    from pipeline.models.hf_io import load_pretrained

    work, overrides = tiny
    config = load_config(TINY, overrides)
    dataset = TokenDataset(config.data.prepared_dir, "train")
    ids = dataset.read_rows(np.arange(dataset.num_rows))["input_ids"]
    first_row = {}
    for row, tokens in enumerate(ids):
        for token in np.unique(tokens):
            first_row.setdefault(int(token), row)
    later = sorted(t for t, row in first_row.items() if SHARD <= row < 3 * SHARD)
    assert later, "no token first appears in shard 1 or 2 of the tiny data"
    token = later[0]
    sequence = first_row[token]
    teacher = _teacher_with_nan(tiny, "nan-embedding", "model.embed_tokens.weight", (token, 0))
    batch = dataset.read_rows(np.array([sequence]))
    logits = load_pretrained(teacher)(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    position = int(np.flatnonzero(~np.isfinite(np.asarray(logits, np.float64)[0]).all(axis=-1))[0])

    cache = tmp_path / "cache"
    code, out, err = cli(_cache_args(tiny, teacher, cache), tmp_path)
    assert code == 2, err
    assert (f"teacher logits hold NaN at split train, sequence {sequence}, position {position}"
            in " ".join(err.split()))
    assert _committed(cache) == set(range(sequence // SHARD))


def test_a_user_error_on_hosts_is_one_and_not_a_lost_host():
    """kdpipe run: a teacher host whose fill raised TeacherOutputError comes back as a
    HostGroupError; its user error is what ``kdpipe run`` reports (exit 2), and the host is
    not counted as lost (no retry). A dead host or a bug is no user error."""
    import ray

    from actors.groups import HostGroupError
    from pipeline.errors import TeacherOutputError

    def remote(err):  # what ray.get raises for a work function that raised ``err``
        return ray.exceptions.RayTaskError("fill", "Traceback ...\n", err).as_instanceof_cause()

    nan = TeacherOutputError("teacher logits hold NaN at split train, sequence 64, position 0")
    failed = HostGroupError("teacher", "fill", {1: remote(nan), 0: remote(nan)}, [], 2)
    assert failed.user_error is failed.failures[0].cause and failed.lost_ranks == []
    assert str(failed.user_error).startswith("teacher logits hold NaN at split train, sequence 64")
    for other in (remote(RuntimeError("a bug")), ray.exceptions.RayActorError()):
        assert HostGroupError("teacher", "fill", {0: remote(nan), 1: other}, [], 2).user_error is None


def test_run_verb_reports_a_user_error_on_hosts(tmp_path, cli, monkeypatch):
    """``kdpipe run`` prints a host's user error as one paragraph and exits 2."""
    import ray

    import actors.driver
    from actors.groups import HostGroupError
    from pipeline.errors import TeacherOutputError

    nan = TeacherOutputError("teacher logits hold NaN at split train, sequence 64, position 0")
    wrapped = ray.exceptions.RayTaskError("fill", "Traceback ...\n", nan).as_instanceof_cause()

    def failing_run(config, **kwargs):
        raise HostGroupError("teacher", "fill", {0: wrapped}, [], 1)

    monkeypatch.setattr(actors.driver, "run", failing_run)
    code, out, err = cli(["run", TINY], tmp_path)
    assert code == 2
    assert err.startswith("kdpipe run: error: teacher logits hold NaN at split train, sequence 64")
    assert "Traceback" not in err
