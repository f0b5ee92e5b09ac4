"""``cache.bytes_per_token`` on the host: the budget shared over groups of 1 (format 4's rule:
each sequence on its own) to S sequences (format 5: a shard), side by side on the same teacher
outputs.

For each budget B and group size G it cuts the candidates of consecutive groups of G sequences
(``pipeline.cache.budget.cut``, each group as one shard of G) and prints the stored B/token (each
group written with the cache's own layout), KL(teacher || reconstruction) and captured mass at
every real token (``audit.candidate_audit``: bytes and KL on the same tokens), the mean k, the
size probes of the search and the host seconds, then, per G, the bytes at which its budgets
reach fixed top-64's KL (interpolated), as a ratio to top-64's bytes (in bench_cache.py --real's
shards).

- default: bench_cache.py's synthetic teacher (``realistic_teacher_logits``), ``--sequences``
  sequences: the host's cost and the direction of the gain, and a CacheWriter's throughput
  storing them in shards of ``--writer-shard`` with one shard worker and with the default;
- ``--real``: the trained teacher of ``bench_cache.py --real`` (its work dir, teacher steps and
  text, reused or trained as that bench does) on the train split of its cached text.

    python benchmarks/bench_budget.py                                   # ~1 min on 2 cores
    python benchmarks/bench_budget.py --real --teacher-steps 210        # ~6 min, teacher reused
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cache_real  # noqa: E402
from bench_cache import (add_teacher_arguments, add_teacher_overrides,  # noqa: E402
                         realistic_teacher_logits)

from pipeline.cache import TargetSpec, audit, budget, compress  # noqa: E402
from pipeline.cache.writer import default_shard_workers  # noqa: E402

def synthetic_outputs(args) -> tuple[list[np.ndarray], int, float]:
    """bench_cache.py's synthetic teacher logits: ([one [S, L, V] batch], vocab, T_cache)."""
    rng = np.random.default_rng(0)
    logits = realistic_teacher_logits(rng, args.sequences * args.seq_len, args.vocab)
    return [logits.reshape(args.sequences, args.seq_len, args.vocab)], args.vocab, 1.0


def real_outputs(args) -> tuple[list[np.ndarray], int, float, np.ndarray]:
    """The real teacher's logits on the train split, in batches, its tokenizer's vocab, the
    caches' temperature and the real tokens' mask ``[S, L]``."""
    from pipeline.data import TokenDataset, prepare_dataset, read_info
    from pipeline.models.build import build_model
    from pipeline.step import TrainState

    workdir = Path(args.real_workdir)
    config, sources, teacher_dir = cache_real.prepare_teacher(
        workdir, args.real_vocab, args.teacher_steps, args.real_kb, args.real_set)
    base = cache_real.bench_config(config, sources, teacher_dir, workdir, args.real_kb, 1)
    if not (Path(base.data.prepared_dir) / "metadata.json").exists():
        prepare_dataset(base.data, progress=False)
    info = read_info(base.data.prepared_dir)
    teacher = build_model(base.model.teacher, frozen=True)
    dataset = TokenDataset(base.data.prepared_dir, "train", vocab_size=teacher.config.vocab_size)
    forward, state = cache_real.teacher_forward(), TrainState.create(teacher)
    rows, batches, masks = info.splits["train"]["num_rows"], [], []
    shard = cache_real.SHARD_SEQUENCES
    for first in range(0, rows, shard):
        batch = dataset.read_rows(np.arange(first, min(first + shard, rows)))
        batches.append(np.asarray(forward(state, batch), np.float32))
        masks.append(batch["attention_mask"] > 0)
    return batches, info.vocab_size, base.cache_temperature, np.concatenate(masks)


def encoded(batches: list[np.ndarray], spec: TargetSpec) -> dict[str, np.ndarray]:
    out = []
    for first, logits in zip(np.cumsum([0] + [len(b) for b in batches]), batches):
        out.append({n: np.asarray(a) for n, a in compress.encode(
            jnp.asarray(logits), jnp.arange(first, first + len(logits)), spec).items()})
    return {n: np.concatenate([o[n] for o in out]) for n in out[0]}


def cut_in_groups(candidates: dict, spec: TargetSpec, group: int, real: np.ndarray) -> dict:
    """The candidates cut in consecutive groups of ``group`` sequences, each sharing its
    budget; the figures of the cut (module docstring)."""
    probes = []
    search = budget.largest_fitting

    def counted(size, limit, most):
        return search(lambda extra: probes.append(extra) or size(extra), limit, most)

    budget.largest_fitting = counted
    stored, size, seconds = [], 0, 0.0
    try:
        for first in range(0, len(real), group):
            part = {n: a[first:first + group] for n, a in candidates.items()}
            start = time.perf_counter()
            stored.append(budget.cut(part, spec, shard=(group, 1)))
            seconds += time.perf_counter() - start
            size += budget.stored_bytes(stored[-1], spec, shard_sequences=group)
    finally:
        budget.largest_fitting = search
    stored = {n: np.concatenate([s[n] for s in stored]) for n in stored[0]}
    kl, mass = audit.candidate_audit(candidates, stored, spec)
    return {"bytes_per_token": size / real.size, "kl": float(kl[real].astype(np.float64).mean()),
            "kl_p99": float(np.percentile(kl[real], 99)), "mass": float(mass[real].mean()),
            "mean_k": float(stored["id_count"][real].mean()), "probes": len(probes),
            "seconds": seconds}


def top64(batches, vocab: int, temperature: float, candidates: dict, real: np.ndarray) -> dict:
    """Fixed top-64 (the default value code): its bytes in bench_cache.py --real's shards
    (``cache_real.SHARD_SEQUENCES``), and its KL, that of the candidates' first 64 (the same
    ids, values and tail)."""
    spec = TargetSpec("topk", vocab, vocab, k=64, temperature=temperature)
    stored, shard = encoded(batches, spec), cache_real.SHARD_SEQUENCES
    size = sum(budget.stored_bytes({n: a[first:first + shard] for n, a in stored.items()}, spec,
                                   shard_sequences=shard)
               for first in range(0, len(real), shard))
    adaptive = TargetSpec("topk", vocab, vocab, k=candidates["cand_ids"].shape[-1], min_k=1,
                          bytes_per_token=1e9, temperature=temperature)
    cut = compress.cut(candidates, np.full(real.shape, 64), adaptive)
    kl, _ = audit.candidate_audit(candidates, cut, adaptive)
    return {"bytes_per_token": size / real.size, "kl": float(kl[real].astype(np.float64).mean())}


def writer_seconds(candidates: dict, spec: TargetSpec, shard: int, workers: int | None) -> float:
    """Seconds a CacheWriter of ``workers`` shard workers takes to store the candidates
    (already encoded: the host's share of a fill alone) in shards of ``shard`` sequences."""
    import tempfile

    from pipeline.cache import CacheManifest, CacheWriter

    sequences, seq_len = candidates["cand_ids"].shape[:2]
    manifest = CacheManifest(spec, "teacher", "tok", "data", seq_len=seq_len,
                             num_sequences=sequences, shard_sequences=shard)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with CacheWriter(tmp, manifest, shard_workers=workers) as writer:
            for first in range(0, sequences, shard):
                rows = np.arange(first, min(first + shard, sequences))
                writer.write_encoded({n: a[rows] for n, a in candidates.items()}, rows,
                                     np.array([-1, 0], np.int32))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32768, help="synthetic teacher's vocab")
    parser.add_argument("--sequences", type=int, default=16, help="synthetic: sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="synthetic: tokens each")
    parser.add_argument("--k", type=int, default=128, help="candidates per token (cache.k)")
    parser.add_argument("--budgets", default="40,60,70,80", help="B/token, comma-separated")
    parser.add_argument("--groups", default="1,16", help="sequences sharing a budget")
    parser.add_argument("--writer-shard", type=int, default=4,
                        help="shard size of the CacheWriter timing (0: none)")
    real = parser.add_argument_group("bench_cache.py --real's teacher (--real)")
    real.add_argument("--real", action="store_true", help="its outputs instead of synthetic")
    add_teacher_arguments(real)
    args = parser.parse_args()
    add_teacher_overrides(args)

    if args.real:
        batches, vocab, temperature, real = real_outputs(args)
        source = f"bench_cache.py --real's teacher ({args.teacher_steps} steps), train split"
    else:
        (batches, vocab, temperature), real = synthetic_outputs(args), None
        source = "bench_cache.py's synthetic teacher"
    real = np.ones(batches[0].shape[:2], bool) if real is None else real
    spec = TargetSpec("topk", vocab, vocab, k=args.k, min_k=1, bytes_per_token=1.0e9,
                      temperature=temperature)
    candidates = encoded(batches, spec)
    groups = [int(g) for g in args.groups.split(",")]
    print(f"{real.shape[0]} sequences x {real.shape[1]} tokens ({int(real.sum())} real), V = "
          f"{vocab}, k = {args.k}; {source}")
    ref = top64(batches, vocab, temperature, candidates, real)
    print(f"fixed top-64: {ref['bytes_per_token']:.2f} B/token, KL {ref['kl']:.4f}")
    print(f"{'B':>5} {'group':>5} {'B/token':>8} {'KL mean':>8} {'KL p99':>7} {'mass':>6} "
          f"{'mean k':>6} {'probes':>6} {'host s':>7} {'tok/s':>7}")
    frontier = {g: [] for g in groups}
    for b in (float(x) for x in args.budgets.split(",")):
        spec = TargetSpec("topk", vocab, vocab, k=args.k, min_k=1, bytes_per_token=b,
                          temperature=temperature)
        for g in groups:
            r = cut_in_groups(candidates, spec, g, real)
            frontier[g].append((r["bytes_per_token"], r["kl"]))
            print(f"{b:5g} {g:5d} {r['bytes_per_token']:8.2f} {r['kl']:8.4f} {r['kl_p99']:7.3f} "
                  f"{r['mass']:6.3f} {r['mean_k']:6.1f} {r['probes']:6d} {r['seconds']:7.2f} "
                  f"{real.size / r['seconds']:7.0f}")
    if args.writer_shard:
        writer_seconds(candidates, spec, args.writer_shard, 1)  # compiles the cut of a shard
        one = writer_seconds(candidates, spec, args.writer_shard, 1)
        several = writer_seconds(candidates, spec, args.writer_shard, None)
        print(f"CacheWriter, shards of {args.writer_shard} at {spec.bytes_per_token:g} B: 1 "
              f"worker {real.size / one:.0f} tok/s, the default ({default_shard_workers()}) "
              f"{real.size / several:.0f} tok/s: {one / several:.2f}x")
    for g in groups:
        at = cache_real.frontier_reaches(frontier[g], ref["kl"])
        print(f"budgets shared over {g} sequences reach top-64's KL "
              + (f"at {at:.1f} B/token: {at / ref['bytes_per_token']:.3f}x its bytes"
                 if at is not None else "outside the budgets measured"))


if __name__ == "__main__":
    main()
