"""``cache.bytes_per_token`` on the host: a budget shared over a shard (format 5) against one per
sequence (format 4), side by side on the same teacher outputs.

For each budget B it cuts one shard's candidates both ways (``pipeline.cache.budget.cut``) and
prints the stored B/token (the shard written with the cache's own layout), KL(teacher ||
reconstruction) and captured mass at every token (``audit.candidate_audit``), the mean k, the
size probes the search made and the host seconds per shard, with the ratios. The teacher
outputs are bench_cache.py's synthetic generator (``realistic_teacher_logits``), so the figures
show the cost and the direction of the gain; ``bench_cache.py --real`` measures the gain on a
real teacher's outputs.

    python benchmarks/bench_budget.py                     # ~1 min on 2 cores
    python benchmarks/bench_budget.py --sequences 64 --seq-len 512 --budgets 66
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache import realistic_teacher_logits  # noqa: E402

from pipeline.cache import TargetSpec, audit, budget, compress  # noqa: E402


def cut_and_measure(candidates: dict, spec: TargetSpec, sequences: int) -> dict:
    """One shard's cut under ``spec`` (format 5: over the shard; 4: per sequence), timed."""
    probes = []
    search = budget.largest_fitting

    def counted(size, limit, most):
        return search(lambda extra: probes.append(extra) or size(extra), limit, most)

    budget.largest_fitting = counted
    try:
        start = time.perf_counter()
        stored = budget.cut(candidates, spec, shard=(sequences, 1))
        seconds = time.perf_counter() - start
    finally:
        budget.largest_fitting = search
    kl, mass = audit.candidate_audit(candidates, stored, spec)
    tokens = stored["id_count"].size
    return {"bytes_per_token": budget.stored_bytes(stored, spec, shard_sequences=sequences)
            / tokens, "kl": float(kl.astype(np.float64).mean()),
            "kl_p99": float(np.percentile(kl, 99)), "mass": float(mass.mean()),
            "mean_k": float(stored["id_count"].mean()), "probes": len(probes),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--sequences", type=int, default=16, help="sequences per shard")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--k", type=int, default=128, help="candidates per token (cache.k)")
    parser.add_argument("--budgets", default="40,66,100", help="B/token, comma-separated")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    logits = realistic_teacher_logits(rng, args.sequences * args.seq_len, args.vocab).reshape(
        args.sequences, args.seq_len, args.vocab)
    print(f"one shard of {args.sequences} x {args.seq_len} tokens, V = {args.vocab}, k = "
          f"{args.k}; bench_cache.py's synthetic teacher")
    print(f"{'B':>5} | {'budget per':10} {'B/token':>8} {'KL mean':>8} {'KL p99':>7} "
          f"{'mass':>6} {'mean k':>6} {'probes':>6} {'s/shard':>7} {'tok/s':>7}")
    for b in (float(x) for x in args.budgets.split(",")):
        shard = TargetSpec("topk", args.vocab, args.vocab, k=args.k, min_k=1,
                           bytes_per_token=b)
        candidates = {name: np.asarray(a) for name, a in compress.encode(
            jnp.asarray(logits), jnp.arange(args.sequences), shard).items()}
        budget.cut(candidates, shard, shard=(args.sequences, 1))  # compiled before timing
        rows = {}
        for label, spec in (("sequence", dataclasses.replace(shard, format_version=4)),
                            ("shard", shard)):
            r = rows[label] = cut_and_measure(candidates, spec, args.sequences)
            print(f"{b:5g} | {label:10} {r['bytes_per_token']:8.2f} {r['kl']:8.4f} "
                  f"{r['kl_p99']:7.3f} {r['mass']:6.3f} {r['mean_k']:6.1f} {r['probes']:6d} "
                  f"{r['seconds']:7.2f} {logits.shape[0] * logits.shape[1] / r['seconds']:7.0f}")
        seq, sh = rows["sequence"], rows["shard"]
        print(f"{'':5} | shard / sequence: KL {sh['kl'] / seq['kl']:.3f}x at bytes "
              f"{sh['bytes_per_token'] / seq['bytes_per_token']:.3f}x; host time "
              f"{sh['seconds'] / seq['seconds']:.2f}x")


if __name__ == "__main__":
    main()
