"""pipeline.data.order, the one definition of the rows host h reads at train step s and at each
evaluation, against independent numpy references; and its consumers read those rows: the
student (``HostBatches``, ``eval_batches``), the targets ``pipeline.train.evaluate`` asks for,
the schedules the remote teacher's requests follow, and the cache's fill order."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, EvalConfig
from pipeline.data import (IGNORE_INDEX, HostBatches, TokenDataset, eval_batches, prepare_dataset,
                           train_bpe_tokenizer)
from pipeline.data.order import (eval_rows, eval_schedule, fill_order, train_rows,
                                 train_schedule)

SEED, BATCH, EVAL_BATCH, SHARD_ROWS = 5, 8, 4, 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared dataset whose eval split (61 rows) leaves a short last eval batch."""
    root = tmp_path_factory.mktemp("order")
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(80)]
    (root / "corpus.txt").write_text("\n".join(docs))
    train_bpe_tokenizer([root / "corpus.txt"], 280, root / "tokenizer.json")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare_dataset(DataConfig(sources=(str(root / "docs.jsonl"),),
                               tokenizer=str(root / "tokenizer.json"),
                               prepared_dir=str(root / "out"), seq_len=8, eval_fraction=0.3,
                               rows_per_shard=50), progress=False)
    assert TokenDataset(root / "out", "eval").num_rows % EVAL_BATCH
    return root / "out"


# ---- independent references: one global sample or one eval slot at a time -------------------

def reference_row(num_rows: int, seed: int, window: int, sample: int) -> int:
    """Row of global sample ``sample``: epoch ``sample // N`` visits blocks of ``window`` rows
    (all rows when 0) in a random order, each block's rows in a random order."""
    rng = np.random.default_rng([seed, sample // num_rows])
    if not window or window >= num_rows:
        return int(rng.permutation(num_rows)[sample % num_rows])
    block_starts = list(range(0, num_rows, window))
    visit = [block_starts[i] for i in rng.permutation(len(block_starts))]
    epoch = []
    for start in visit:
        size = min(window, num_rows - start)
        epoch.extend(start + int(i) for i in rng.permutation(size))
    return epoch[sample % num_rows]


def reference_train(num_rows: int, window: int, offset: int, host: int, hosts: int) -> list[int]:
    """Rows host ``host`` of ``hosts`` reads at the step starting at global sample ``offset``."""
    per_host = BATCH // hosts
    return [reference_row(num_rows, SEED, window, offset + host * per_host + i)
            for i in range(per_host)]


def reference_eval(num_rows: int, host: int, hosts: int,
                   max_batches: int | None = None) -> list[tuple[list, list]]:
    """Per eval batch: (rows, real) of host ``host``; padding past the last row reads row N-1."""
    per_host = EVAL_BATCH // hosts
    count = (num_rows + EVAL_BATCH - 1) // EVAL_BATCH
    if max_batches is not None:
        count = min(count, max_batches)
    out = []
    for b in range(count):
        slots = [b * EVAL_BATCH + host * per_host + i for i in range(per_host)]
        out.append(([min(s, num_rows - 1) for s in slots], [s < num_rows for s in slots]))
    return out


class RecordingDataset(TokenDataset):
    """A TokenDataset that records the row ids it is asked for."""

    def read_rows(self, rows):
        self.reads.append(np.asarray(rows).tolist())
        return super().read_rows(rows)


def recording(prepared: Path, split: str) -> RecordingDataset:
    dataset = RecordingDataset(prepared, split)
    dataset.reads = []
    return dataset


# ---- train ----------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [0, 8])
def test_train_rows_are_the_reference_rows_the_student_and_the_remote_schedule_read(prepared,
                                                                                    window):
    dataset = TokenDataset(prepared, "train")
    n = dataset.num_rows
    steps = n // BATCH + 3  # across an epoch boundary
    for hosts in (1, 2):
        for host in range(hosts):
            for start in (0, 3 * BATCH):  # a fresh run and a run resumed at step 3
                where = dict(seed=SEED, shuffle_window=window, global_batch=BATCH,
                             host_index=host, host_count=hosts)
                batches = HostBatches(dataset, offset=start, **where)
                schedule = train_schedule(n, start, **where)
                for step in range(steps):
                    offset = start + step * BATCH
                    want = reference_train(n, window, offset, host, hosts)
                    assert train_rows(n, offset, **where).tolist() == want
                    assert next(schedule).tolist() == want  # what the remote teacher is asked
                    assert batches.rows_at(offset).tolist() == want  # what train prefetches
                    rows, batch = next(batches)  # what the student reads
                    assert rows.tolist() == want
                    np.testing.assert_array_equal(batch["input_ids"],
                                                  dataset.read_rows(np.asarray(want))["input_ids"])


# ---- eval -----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_batches", [None, 3])
def test_eval_rows_are_the_reference_rows_the_student_reads(prepared, max_batches):
    """eval_batches reads the rows the targets are read for, padding included (it used to
    read row 0 for the padding of a short last batch, whose targets are read at row N-1)."""
    n = TokenDataset(prepared, "eval").num_rows
    for hosts in (1, 2):
        for host in range(hosts):
            want = reference_eval(n, host, hosts, max_batches)
            got = eval_rows(n, EVAL_BATCH, host_index=host, host_count=hosts,
                            max_batches=max_batches)
            assert [(b.rows.tolist(), b.real.tolist()) for b in got] == want
            schedule = eval_schedule(n, EvalConfig(batch_size=EVAL_BATCH, max_batches=max_batches),
                                     host_index=host, host_count=hosts)
            cycled = [next(schedule).tolist() for _ in range(2 * len(want))]
            assert cycled == 2 * [rows for rows, _ in want]
            dataset = recording(prepared, "eval")
            batches = list(eval_batches(dataset, EVAL_BATCH, host_index=host, host_count=hosts,
                                        max_batches=max_batches))
            assert dataset.reads == [rows for rows, _ in want]
            for (rows, real), batch in zip(want, batches):
                real = np.asarray(real)
                read = dataset.read_rows(np.asarray(rows))
                for key, blank in (("input_ids", 0), ("attention_mask", 0),
                                   ("labels", IGNORE_INDEX)):
                    np.testing.assert_array_equal(batch[key][real], read[key][real])
                    assert (batch[key][~real] == blank).all()
    assert not reference_eval(n, 1, 2)[-1][1][-1]  # the case of a padded last batch is covered


def test_evaluate_asks_the_targets_of_the_rows_it_reads(prepared, monkeypatch):
    """pipeline.train.evaluate hands its targets reader the rows of each batch it evaluates."""
    import pipeline.train as train
    from pipeline.config import load_config
    from tiny_run import TINY

    steps = []

    class Metrics:
        def as_dict(self):
            return {"num_tokens": 1.0}

    def step(state, batch, teacher, **options):
        steps.append(batch)
        return state, Metrics()

    monkeypatch.setattr(train, "jit_distillation_step", step)
    monkeypatch.setattr(train, "global_batch", lambda local, sharding: local)
    config = load_config(TINY, [f"data.prepared_dir={prepared}", f"eval.batch_size={EVAL_BATCH}",
                                "eval.max_batches=null"])
    dataset = TokenDataset(prepared, "eval")

    class Reader:
        def read(self, rows):
            asked.append(np.asarray(rows).tolist())
            return {"teacher_rows": np.asarray(rows)}

    for host in range(2):
        asked, steps[:] = [], []
        train.evaluate(config, None, dataset, host=train.Host(host, 2), sharding=None,
                       reader=Reader())
        want = [rows for rows, _ in reference_eval(dataset.num_rows, host, 2)]
        assert asked == want
        assert [b["teacher_rows"].tolist() for b in steps] == want
        for rows, batch in zip(want, steps):
            real = batch["attention_mask"].any(axis=1)
            np.testing.assert_array_equal(batch["input_ids"][real],
                                          dataset.read_rows(np.asarray(rows))["input_ids"][real])


@pytest.mark.parametrize("window", [0, 8])
def test_the_remote_teachers_schedules_are_the_rows_the_student_reads(prepared, window):
    """What pipeline.targets.run_targets has teacher hosts compute ahead, batch after batch, is
    what HostBatches and evaluate read (RemoteTargets.take matches a request to its rows)."""
    from pipeline.config import load_config
    from pipeline.targets import run_targets
    from tiny_run import TINY

    config = load_config(TINY, [f"data.prepared_dir={prepared}", f"data.seed={SEED}",
                                f"data.shuffle_window={window}", f"train.global_batch_size={BATCH}",
                                f"eval.batch_size={EVAL_BATCH}", "eval.max_batches=null",
                                "cluster.teacher_source=remote"])
    train, n_eval = TokenDataset(prepared, "train"), TokenDataset(prepared, "eval").num_rows
    for host in range(2):
        schedules = {}

        def remote(split, schedule, wanted):
            schedules[split] = schedule
            return object()

        run_targets(config, "remote", teacher_fp="teacher", offset=3 * BATCH, host_index=host,
                    host_count=2, remote=remote, on_wait=lambda split, missing: None)
        batches = HostBatches(train, seed=SEED, global_batch=BATCH, host_index=host, host_count=2,
                              offset=3 * BATCH, shuffle_window=window)
        for _ in range(train.num_rows // BATCH + 2):
            np.testing.assert_array_equal(next(schedules["train"]), next(batches)[0])
        want = [rows for rows, _ in reference_eval(n_eval, host, 2)]
        assert [next(schedules["eval"]).tolist() for _ in range(2 * len(want))] == 2 * want


# ---- the cache's fill order -----------------------------------------------------------------

def first_reads(prepared: Path, *, window: int, steps: int, every: int, start_step: int) -> list:
    """The (split, shard) pairs in the order a 2-host student first reads them, from what
    HostBatches and eval_batches read (the eval rows needed at the first evaluation after
    ``start_step``, at a multiple of ``every`` or at the last step)."""
    train = recording(prepared, "train")
    hosts = [HostBatches(train, seed=SEED, global_batch=BATCH, host_index=h, host_count=2,
                         offset=start_step * BATCH, shuffle_window=window) for h in range(2)]
    evaluation = recording(prepared, "eval")
    needed: list = []
    for step in range(start_step + 1, steps + 1):
        for host in hosts:
            next(host)
        needed += [("train", row // SHARD_ROWS) for row in itertools.chain(*train.reads)]
        train.reads.clear()
        if step % every == 0 or step == steps:
            for h in range(2):
                list(eval_batches(evaluation, EVAL_BATCH, host_index=h, host_count=2))
            rows = itertools.chain(*evaluation.reads)
            needed += sorted({("eval", row // SHARD_ROWS) for row in rows})
            evaluation.reads.clear()
    return list(dict.fromkeys(needed))


@pytest.mark.parametrize("window, steps, start_step", [(0, 6, 0), (16, 6, 0), (0, 40, 0),
                                                      (16, 40, 7), (0, 9, 4)])
def test_fill_order_is_the_order_the_student_first_reads_the_shards(prepared, window, steps,
                                                                    start_step):
    num_rows = {split: TokenDataset(prepared, split).num_rows for split in ("train", "eval")}
    every = 5
    shards = {split: set(range(-(-n // SHARD_ROWS))) for split, n in num_rows.items()}
    order = fill_order(num_rows, shards, data=DataConfig(seed=SEED, shuffle_window=window),
                       eval_config=EvalConfig(every_steps=every, batch_size=EVAL_BATCH),
                       global_batch=BATCH, steps=steps, shard_rows=SHARD_ROWS,
                       start=(start_step, start_step * BATCH))
    read = first_reads(prepared, window=window, steps=steps, every=every, start_step=start_step)
    never = [(split, s) for split in ("train", "eval") for s in sorted(shards[split])
             if (split, s) not in read]
    assert order == read + never
    # only what is still pending is queued, in the same order
    pending = {"train": set(list(shards["train"])[::2]), "eval": {0}}
    partial = fill_order(num_rows, pending, data=DataConfig(seed=SEED, shuffle_window=window),
                         eval_config=EvalConfig(every_steps=every, batch_size=EVAL_BATCH),
                         global_batch=BATCH, steps=steps, shard_rows=SHARD_ROWS,
                         start=(start_step, start_step * BATCH))
    assert partial == [job for job in order if job[1] in pending[job[0]]]
