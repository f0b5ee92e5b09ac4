"""Attention forward + backward, dense (``xla``) vs ``blockwise``: XLA memory, FLOPs and CPU time.

Compile only for the table (``jax.jit(f).lower(ShapeDtypeStruct...).compile()``: nothing is
allocated): at Llama-3.2-1B's attention shape (32 query heads, 8 key/value heads, head_dim 64),
causal, batch 1, per sequence length, the program ``out, (dq, dk, dv) = vjp(attention)`` and

- XLA temp MiB (``memory_analysis().temp_size_in_bytes``);
- FLOPs from XLA's ``cost_analysis()``, which counts a while loop's body once whatever its trip
  count, so the blockwise figure is one block pair's work, not the program's;
- matmul FLOPs counted by hand: dense ``12·b·n·l²·h`` (2 matmuls forward, 4 backward);
  blockwise ``14·b·n·B²·h`` per visited block pair of size ``B`` (2 forward, 5 backward with
  the scores recomputed), ``nb(nb+1)/2`` pairs of ``nb = l/B`` when causal (masked blocks
  skipped).

Then both run at ``--time-seq`` on this CPU: best of ``--repeats`` forward + backward times.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.models.attention import attention

IMPLEMENTATIONS = ("xla", "blockwise")


def forward_backward(implementation, block_size):
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attention(
            q, k, v, implementation=implementation, block_size=block_size), q, k, v)
        return out, vjp(d_out)
    return jax.jit(run)


def shapes(args, seq):
    q = jax.ShapeDtypeStruct((args.batch, seq, args.heads, args.head_dim), args.dtype)
    kv = jax.ShapeDtypeStruct((args.batch, seq, args.kv_heads, args.head_dim), args.dtype)
    return q, kv, kv, q


def matmul_flops(args, implementation, seq):
    per_block = args.batch * args.heads * args.head_dim
    if implementation == "xla":
        return 12 * per_block * seq * seq
    block = min(args.block_size, seq)
    blocks = -(-seq // block)
    return 14 * per_block * block * block * blocks * (blocks + 1) // 2


def compiled_figures(args, implementation, seq):
    compiled = forward_backward(implementation, args.block_size).lower(
        *shapes(args, seq)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
            "xla_flops": float(cost.get("flops", float("nan"))),
            "matmul_flops": float(matmul_flops(args, implementation, seq))}


def best_time_ms(args):
    rng = np.random.default_rng(0)
    arrays = [jnp.asarray(rng.normal(size=s.shape), s.dtype) for s in shapes(args, args.time_seq)]
    functions = {name: forward_backward(name, args.block_size) for name in IMPLEMENTATIONS}
    best = dict.fromkeys(IMPLEMENTATIONS, float("inf"))
    for name, function in functions.items():
        jax.block_until_ready(function(*arrays))  # compile
    for _ in range(args.repeats):  # in turns
        for name, function in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(function(*arrays))
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--time-seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    rows = [{"seq": seq, **{f"{name}_{key}": value for name in IMPLEMENTATIONS
                            for key, value in compiled_figures(args, name, seq).items()}}
            for seq in args.seqs]
    print(f"causal attention forward + backward, batch {args.batch}, {args.heads} heads, "
          f"{args.kv_heads} kv heads, head_dim {args.head_dim}, {args.dtype}, blockwise block "
          f"{args.block_size}: compile only, per device")
    print(f"{'seq':>6} {'dense MiB':>10} {'block MiB':>10} {'dense/block':>11} "
          f"{'dense XLA GF':>12} {'block XLA GF*':>13} {'dense mm GF':>11} {'block mm GF':>11}")
    for r in rows:
        print(f"{r['seq']:6d} {r['xla_temp_mib']:10.1f} {r['blockwise_temp_mib']:10.1f} "
              f"{r['xla_temp_mib'] / r['blockwise_temp_mib']:11.1f} "
              f"{r['xla_xla_flops'] / 1e9:12.1f} {r['blockwise_xla_flops'] / 1e9:13.1f} "
              f"{r['xla_matmul_flops'] / 1e9:11.1f} {r['blockwise_matmul_flops'] / 1e9:11.1f}")
    print("* XLA's cost analysis counts a loop body once: one block pair, not the program")

    times = best_time_ms(args)
    print(f"CPU forward + backward at seq {args.time_seq}, best of {args.repeats}: "
          + ", ".join(f"{name} {ms:.0f} ms" for name, ms in times.items()))
    ratios = {"blockwise/dense time": times["blockwise"] / times["xla"]}
    for small, large in zip(rows, rows[1:]):
        for name in IMPLEMENTATIONS:
            ratios[f"{name} temp {large['seq']}/{small['seq']}"] = (
                large[f"{name}_temp_mib"] / small[f"{name}_temp_mib"])
    last = rows[-1]
    ratios[f"dense/blockwise temp at {last['seq']}"] = (
        last["xla_temp_mib"] / last["blockwise_temp_mib"])
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "cpu_ms": times, "ratios": ratios}, f,
                      indent=1)


if __name__ == "__main__":
    main()
