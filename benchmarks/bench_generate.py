"""Decode throughput of generation with the KV cache vs recomputing the whole prefix each token.

Greedy generation of ``--new-tokens`` tokens after ``--prompt`` random prompt tokens, batch
``--batch``, by a randomly initialised ~100M-parameter Llama (the shape of
benchmarks/bench_model.py), on the local devices (CPU by default), two ways in one run:

- ``kv cache``: ``pipeline.generate.generate``: one prefill, then one token per step against the
  cache (all ``--new-tokens`` steps timed, the prefill included).
- ``recompute``: each token runs the whole prefix through the model's plain forward (jitted,
  the prefix right-padded to a multiple of ``--bucket`` tokens so that a few shapes compile;
  a causal model's earlier positions ignore the padding) and takes the argmax at its end.

Compilation is excluded from both (a first call compiles, the second is timed). The recompute
path's steps grow with the prefix, so timing only its first ``--recompute-steps`` steps (the
default, to keep the run to minutes on a CPU) overstates its tokens/s: the printed ratio is then
a lower bound of the ratio over all ``--new-tokens`` steps (``--recompute-steps`` equal to
``--new-tokens`` times them all). Both paths' tokens are compared (the same greedy tokens,
up to float ties).

    python benchmarks/bench_generate.py                       # 100M, batch 8, 256 new tokens
    python benchmarks/bench_generate.py --recompute-steps 256 # the recompute timed in full
    python benchmarks/bench_generate.py --layers 2 --new-tokens 32 --recompute-steps 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.generate import Sampling, generate
from pipeline.models.llama import Llama

import bench_model  # benchmarks/bench_model.py: the model shape options


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench_model.add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="prompts generated together")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--recompute-steps", type=int, default=32,
                        help="recompute steps timed (its first ones: a lower bound on the ratio "
                             "unless equal to --new-tokens)")
    parser.add_argument("--bucket", type=int, default=16,
                        help="the recompute's prefix is right-padded to a multiple of this")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    for name in ("batch", "prompt", "new_tokens", "recompute_steps", "bucket"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.recompute_steps > args.new_tokens:
        parser.error(f"--recompute-steps: expected at most --new-tokens ({args.new_tokens})")
    return args


def _timed(fn):
    """(result, seconds) of ``fn()`` run to completion."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def main():
    args = parse_args()
    total = args.prompt + args.new_tokens
    config = bench_model.model_config(args, max_position_embeddings=total + args.bucket)
    model = Llama(config, rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    prompts = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))
    mask = np.ones_like(prompts)

    def cached():
        return generate(model, prompts, mask, max_new_tokens=args.new_tokens,
                        sampling=Sampling(temperature=0)).tokens

    _, cached_compile_s = _timed(cached)
    cached_tokens, cached_s = _timed(cached)

    @nnx.jit
    def next_token(model, ids, last):
        return jnp.argmax(model(ids).logits[:, last], axis=-1)

    def recompute():
        seq = np.zeros((args.batch, total + args.bucket), np.int32)
        seq[:, :args.prompt] = prompts
        for t in range(args.recompute_steps):
            length = args.prompt + t
            padded = -(-length // args.bucket) * args.bucket
            seq[:, length] = np.asarray(next_token(model, jnp.asarray(seq[:, :padded]),
                                                   length - 1))
        return seq[:, args.prompt:args.prompt + args.recompute_steps]

    _, recompute_compile_s = _timed(recompute)  # compiles every bucket the steps meet
    recompute_tokens, recompute_s = _timed(recompute)

    steps = args.recompute_steps
    same = float(np.mean(np.asarray(cached_tokens)[:, :steps] == recompute_tokens))
    rows = [dict(path="kv cache", steps=args.new_tokens, seconds=cached_s,
                 compile_s=cached_compile_s - cached_s,
                 tokens_per_s=args.batch * args.new_tokens / cached_s),
            dict(path="recompute", steps=steps, seconds=recompute_s,
                 compile_s=recompute_compile_s - recompute_s,
                 tokens_per_s=args.batch * steps / recompute_s)]
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"model: {params / 1e6:.1f}M params ({args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}); batch {args.batch}, prompt {args.prompt}, {args.new_tokens} "
          f"new tokens, greedy; {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"{'path':10} {'steps':>6} {'seconds':>9} {'~compile s':>11} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['path']:10} {r['steps']:6d} {r['seconds']:9.2f} {r['compile_s']:11.1f} "
              f"{r['tokens_per_s']:10.1f}")
    bound = "" if steps == args.new_tokens else (
        f" (a lower bound: recompute timed over its first {steps} of {args.new_tokens} steps, "
        f"whose later ones are slower)")
    print(f"kv cache / recompute tokens/s: {ratio:.1f}x{bound}")
    print(f"same greedy tokens over the first {steps} steps: {same:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), params=params, rows=rows, ratio=ratio,
                           same_tokens=same, lower_bound=bool(bound),
                           backend=jax.default_backend(), machine=platform.machine()), f,
                      indent=2)


if __name__ == "__main__":
    main()
