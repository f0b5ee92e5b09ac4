"""Where a distillation run spends its time: the pipeline's figures, side by side in one run.

1. Student step fed from the cache (``offline``) vs with a live teacher about 4x its size
   co-located in the step (EasyDeL's way): steady-state tokens/s of ``pipeline.train.train``
   both ways on the same data (goal: offline >= 2x faster).
2. Cache fill throughput with 1 vs 2 teacher hosts, each host pinned to one core with XLA's
   threads limited to it (``HostEnv(cores_per_host=1)``), the shards handed out by the driver's
   work queue, after each host's warm-up (teacher loaded and compiled) (goal: >= 1.8x); and at
   equal hosts, 2 one-host replicas vs 1 replica of 2 hosts (``cluster.teacher.hosts_per_replica``:
   one JAX program over both, gloo collectives between them, the teacher's weights split
   over their devices), the price of splitting a teacher that fits on one host.
3. One end-to-end ``kdpipe run`` (offline, fresh cache, teacher and student groups at once),
   its wall time split into phases.
4. The same run with ``data.shuffle_window`` (blocks of rows shuffled, then rows within a
   block): how long the student waits for shards, and the total, vs the uniform shuffle of (3),
   whose first steps need nearly every shard.

The workspace (a BPE tokenizer and token data from Python stdlib sources, a randomly
initialised teacher) is built first under --workdir. Defaults fit a 2-core machine in a few
minutes; the sizes are flags.

    python benchmarks/bench_pipeline.py [--steps 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", help="where data, caches and runs go (default: a temp dir)")
    p.add_argument("--files", type=int, default=16, help="stdlib .py files in the corpus")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    p.add_argument("--steps", type=int, default=80,
                   help="student steps per timing run (tokens/s over the second half)")
    p.add_argument("--student", default="64,192,2,4",
                   help="student hidden,intermediate,layers,heads")
    p.add_argument("--teacher", default="128,320,3,4",
                   help="teacher hidden,intermediate,layers,heads (about 4x the student)")
    p.add_argument("--k", type=int, default=32, help="top-k of the cache")
    p.add_argument("--shard-sequences", type=int, default=64, help="sequences per cache shard")
    p.add_argument("--fill-shards", type=int, default=32,
                   help="train shards written in the fill benchmark (2), at most all of them")
    p.add_argument("--e2e-steps", type=int, default=60, help="student steps of the end-to-end run (3)")
    p.add_argument("--shuffle-window", type=int, default=128,
                   help="data.shuffle_window of the second end-to-end run (4), in rows")
    p.add_argument("--fill-only", action="store_true", help="run the fill benchmark (2) only")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def _arch(text: str, prefix: str) -> list[str]:
    hidden, inter, layers, heads = (int(x) for x in text.split(","))
    return [f"{prefix}={{hidden_size: {hidden}, intermediate_size: {inter}, "
            f"num_hidden_layers: {layers}, num_attention_heads: {heads}, "
            f"max_position_embeddings: 1024}}"]


def _params(arch: str, vocab: int) -> int:
    hidden, inter, layers, _ = (int(x) for x in arch.split(","))
    return vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter)


def build_workspace(args, work: Path) -> list[str]:
    """Tokenizer, prepared data and a saved teacher under ``work``; the config overrides."""
    from actors.demo import stdlib_sources
    from pipeline.config import load_config
    from pipeline.data import prepare_dataset, read_info, train_bpe_tokenizer
    from pipeline.models.build import build_model
    from pipeline.models.hf_io import save_pretrained
    from pipeline.models.sharding import make_mesh

    sources = stdlib_sources(args.files)
    overrides = [f"data.tokenizer={work / 'tokenizer.json'}", f"data.prepared_dir={work / 'data'}",
                 f"data.seq_len={args.seq_len}", "data.eval_fraction=0.05",
                 f"train.global_batch_size={args.batch}", f"cache.k={args.k}",
                 f"cache.shard_sequences={args.shard_sequences}", "logging.tensorboard=false",
                 "logging.progress=false", "logging.report=false", "eval.every_steps=0",
                 "checkpoint.async_save=false", *_arch(args.student, "model.student")]
    teacher_arch = _arch(args.teacher, "model.teacher")
    config = load_config(ROOT / "configs" / "demo.yaml", overrides + teacher_arch)
    if not (work / "teacher" / "config.json").exists():
        train_bpe_tokenizer(sources, args.vocab, Path(config.data.tokenizer))
        prepare_dataset(dataclasses.replace(config.data, sources=tuple(sources)), progress=False)
        vocab = read_info(config.data.prepared_dir).vocab_size
        save_pretrained(build_model(config.model.teacher, vocab, 1, make_mesh()), work / "teacher")
    return overrides + [f"model.teacher={{path: {work / 'teacher'}}}"]


def warm_up(host, config, teacher_fp: str, hosts_per_replica: int) -> None:
    """Load the teacher and compile its forward pass and the encoder: one eval shard into a
    scratch cache of this host's replica's own."""
    from actors.work import fill_shard

    replica = host.rank // hosts_per_replica
    scratch = dataclasses.replace(config.cache, path=f"{config.cache.path}-warmup-{replica}")
    fill_shard(host, dataclasses.replace(config, cache=scratch), "eval", 0, teacher_fp)


def fill_benchmark(config, num_shards: int, hosts: int, teacher_fp: str,
                   hosts_per_replica: int = 1) -> dict:
    """Fill the first ``num_shards`` shards of ``config``'s train cache with ``hosts`` one-core
    teacher hosts in replicas of ``hosts_per_replica``, fed by the driver's shard queue, after
    a warm-up (teacher loaded, compiled); tokens/s from the first shard handed out to the last
    committed."""
    import ray

    from actors.teacher_group import ShardQueue, TeacherWork
    from actors.groups import GroupSpec, HostGroup
    from actors.hosts import HostEnv

    # from empty caches (a reused --workdir holds committed shards, which a fill skips)
    for path in Path(config.cache.path).parent.glob(f"{Path(config.cache.path).name}*"):
        shutil.rmtree(path)
    shards = [("train", s) for s in range(num_shards)]
    with HostGroup.create(GroupSpec.local("teacher", hosts, HostEnv(cores_per_host=1))) as teachers:
        teachers.setup_jax(distributed=True, hosts_per_program=hosts_per_replica)
        teachers.run(warm_up, config, teacher_fp, hosts_per_replica)
        work = TeacherWork(teachers, config, ShardQueue(shards), teacher_fp)
        while work.busy:
            ready, _ = ray.wait(work.refs, num_returns=1)
            work.collect(ready[0])
    tokens = sum(r.tokens for r in work.results)
    by_replica = [sum(1 for _, _, r in work.queue.done if r == replica)
                  for replica in range(work.replicas)]
    return {"hosts": hosts, "hosts_per_replica": hosts_per_replica, "seconds": work.fill_seconds,
            "tokens": tokens, "tokens_per_s": tokens / work.fill_seconds,
            "shards_per_replica": by_replica}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray
    from rich.console import Console

    from actors.cluster import connect
    from actors.driver import run
    from pipeline.config import load_config
    from pipeline.data import read_info
    from pipeline.models.hf_io import teacher_fingerprint
    from pipeline.train import train

    # absolute: the host actors run in other working directories
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    overrides = build_workspace(args, work)
    info = read_info(work / "data")
    train_rows = info.splits["train"]["num_rows"]
    fill_shards = min(args.fill_shards, train_rows // args.shard_sequences)
    demo = ROOT / "configs" / "demo.yaml"

    def config(name: str, *more: str):
        return load_config(demo, [*overrides, f"run_dir={work / 'runs' / name}", *more])

    figures: dict = {"workspace": {"train_rows": train_rows, "seq_len": info.seq_len,
                                   "vocab": info.vocab_size,
                                   "student_params": _params(args.student, info.vocab_size),
                                   "teacher_params": _params(args.teacher, info.vocab_size),
                                   "seconds": time.perf_counter() - started}}
    teacher_fp = teacher_fingerprint(work / "teacher")

    # (2) cache fill, 1 vs 2 one-core teacher hosts; 2 hosts as 2 replicas vs 1 replica
    connect(dashboard=False)
    try:
        fills = {}
        for hosts, per_replica in ((1, 1), (2, 1), (2, 2)):
            cache = work / f"cache-fill-{hosts}x{per_replica}"
            fills[hosts, per_replica] = fill_benchmark(
                config("fill", f"cache.path={cache}"), fill_shards, hosts, teacher_fp, per_replica)
        figures["fill"] = {f"{h} hosts, {r} per replica": f for (h, r), f in fills.items()}
    finally:
        ray.shutdown()
    replicas_ratio = fills[2, 2]["tokens_per_s"] / fills[2, 1]["tokens_per_s"]
    fill_rows = []
    for (hosts, per_replica), f in fills.items():
        fill_rows.append((f"(2) cache fill, {hosts} one-core teacher host(s), "
                          f"{hosts // per_replica} replica(s) of {per_replica}",
                          f"{f['tokens_per_s']:,.0f} tok/s  ({f['seconds']:.1f} s, shards/replica "
                          f"{f['shards_per_replica']})"))
    fill_rows.append(("(2) fill, 2 hosts: 1 replica of 2 / 2 replicas of 1",
                      f"{replicas_ratio:.2f}x"))
    if args.fill_only:
        figures["headline"] = {"fill_replica_of_2_vs_2_replicas_of_1": replicas_ratio}
        return _report(args, figures, fill_rows)

    # (3) end to end: `kdpipe run`, offline, fresh cache, both groups at once
    e2e_more = [f"train.steps={args.e2e_steps}", f"logging.every_steps={max(1, args.e2e_steps // 4)}",
                f"checkpoint.every_steps={args.e2e_steps}"]
    e2e = config("e2e", f"cache.path={work / 'cache-e2e'}", *e2e_more)
    outcome = run(e2e, console=Console(file=io.StringIO()))  # completes the cache (1) reads
    figures["end_to_end"] = {"seconds": outcome.seconds, "shards": len(outcome.shards_written),
                             "steps": outcome.result.step}
    # (4) the same with a windowed shuffle: the student needs the first shards only
    windowed = run(config("e2e-window", f"cache.path={work / 'cache-e2e-window'}",
                          f"data.shuffle_window={args.shuffle_window}", *e2e_more),
                   console=Console(file=io.StringIO()))
    figures["end_to_end_windowed"] = {"seconds": windowed.seconds,
                                      "shuffle_window": args.shuffle_window}

    # (1) student step: cache vs live co-located teacher, same data, steady state
    timing = [f"train.steps={args.steps}", f"logging.every_steps={args.steps // 2}",
              f"checkpoint.every_steps={args.steps}"]
    steps = {}
    for source in ("offline", "live"):
        more = [f"cluster.teacher_source={source}", f"cache.path={work / 'cache-e2e'}"]
        result = train(config(f"step-{source}", *timing, *more))
        steps[source] = {"tokens_per_s": result.tokens_per_s,
                         "ms_per_step": 1000 * args.batch * info.seq_len / result.tokens_per_s}
    figures["step"] = steps

    speedup = steps["offline"]["tokens_per_s"] / steps["live"]["tokens_per_s"]
    scaling = fills[2, 1]["tokens_per_s"] / fills[1, 1]["tokens_per_s"]
    waits = (outcome.seconds["student waiting"], windowed.seconds["student waiting"])
    figures["headline"] = {"offline_vs_live_step_speedup": speedup, "fill_scaling_2_vs_1": scaling,
                           "fill_replica_of_2_vs_2_replicas_of_1": replicas_ratio,
                           "student_waiting_uniform_vs_windowed": list(waits),
                           "end_to_end_uniform_vs_windowed": outcome.seconds["total"]
                           / windowed.seconds["total"]}

    rows = [(f"(1) student step, {source} teacher", f"{s['ms_per_step']:.1f} ms  "
             f"({s['tokens_per_s']:,.0f} tok/s)") for source, s in steps.items()]
    rows += fill_rows[:-1]
    rows += [(f"(3) end to end: {phase}", f"{seconds:.1f} s  (windowed shuffle: "
              f"{windowed.seconds.get(phase, float('nan')):.1f} s)")
             for phase, seconds in outcome.seconds.items()]
    rows += [("(1) offline vs live step speedup (goal >= 2)", f"{speedup:.2f}x"),
             ("(2) fill scaling, 2 vs 1 teacher hosts (goal >= 1.8)", f"{scaling:.2f}x"),
             fill_rows[-1],
             (f"(4) student waiting for shards, uniform vs window {args.shuffle_window}",
              f"{waits[0]:.1f} s vs {waits[1]:.1f} s"),
             ("(4) end to end total, uniform / windowed shuffle",
              f"{figures['headline']['end_to_end_uniform_vs_windowed']:.2f}x")]
    return _report(args, figures, rows)


def _report(args, figures: dict, rows: list[tuple[str, str]]) -> dict:
    """Print the table of ``rows`` (the headline ratios last), write --json; the figures."""
    from rich.console import Console
    from rich.table import Table

    ws = figures["workspace"]
    table = Table(title=f"kdpipe pipeline benchmark (student {ws['student_params']:,} params, "
                        f"teacher {ws['teacher_params']:,}, batch {args.batch} x {ws['seq_len']} "
                        f"tokens)")
    for column in ("measure", "value"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str) + "\n")
    return figures


if __name__ == "__main__":
    main()
