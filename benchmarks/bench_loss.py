"""XLA temp memory and time of kdpipe's distillation losses vs the plain formulas.

Three comparisons, forward + backward, side by side in one run:

1. loss on logits [tokens, vocab]: ``pipeline.losses.distillation_loss`` vs the naive jnp
   formula (softmax / log_softmax / sum) and the EasyDeL-0.3-style difference of cross-entropies,
   in float32 and bfloat16;
2. the fused head + loss (``pipeline.fused_head``) vs materialising ``hidden @ head.T``,
   gradients w.r.t. hidden states and head;
3. the sparse-target losses (top-k, sampled) vs the dense loss.

Memory is ``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`` at the full
sizes (compile only: nothing is allocated). Time is the median wall time of the jitted
forward+backward at the ``--time-*`` sizes, which default to smaller ones so that the run fits
a shared 2-core machine; pass the full sizes to time those too. The table says which is which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline import losses
from pipeline.fused_head import fused_head_distillation_loss

TEMPERATURE = 4.0


def naive_loss(student, teacher):
    t = teacher.astype(jnp.float32) / TEMPERATURE
    s = student.astype(jnp.float32) / TEMPERATURE
    p = jax.nn.softmax(t)
    kl = jnp.sum(p * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s)), axis=-1)
    return TEMPERATURE ** 2 * jnp.mean(kl)


def cross_entropy_difference_loss(student, teacher):
    """KL as CE(p, q) − H(p) in the input dtype: the formulation of EasyDeL issue #267."""
    p = jax.nn.softmax(teacher / TEMPERATURE)
    cross = -jnp.sum(p * jax.nn.log_softmax(student / TEMPERATURE), axis=-1)
    entropy = -jnp.sum(p * jax.nn.log_softmax(teacher / TEMPERATURE), axis=-1)
    return TEMPERATURE ** 2 * jnp.mean((cross - entropy).astype(jnp.float32))


def ours_loss(student, teacher):
    return losses.distillation_loss(student, teacher, temperature=TEMPERATURE)[0]


def temp_mib(f, *shapes, argnums=0):
    compiled = jax.jit(jax.value_and_grad(f, argnums)).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


def median_ms(f, args, repeats, argnums=0):
    step = jax.jit(jax.value_and_grad(f, argnums))
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def random(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def topk_targets(teacher, k):
    log_p = jax.nn.log_softmax(teacher.astype(jnp.float32) / TEMPERATURE)
    logprobs, ids = jax.lax.top_k(log_p, k)
    return losses.TopKTargets(ids, logprobs, jnp.log1p(-jnp.exp(logprobs).sum(-1)))


def sampled_targets(rng, tokens_shape, vocab, n):
    ids = jnp.asarray(rng.integers(0, vocab, tokens_shape + (n,)), jnp.int32)
    return losses.SampledTargets(ids, jnp.ones(ids.shape, jnp.float32),
                                 jnp.ones(tokens_shape, jnp.float32))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768, help="vocab of comparison 1 and 3")
    parser.add_argument("--head-vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--time-tokens", type=int, default=1024)
    parser.add_argument("--time-vocab", type=int, default=32768)
    parser.add_argument("--time-head-vocab", type=int, default=32768)
    parser.add_argument("--time-hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []

    def row(section, name, dtype, mib, ms):
        rows.append({"section": section, "name": name, "dtype": dtype, "temp_mib": mib,
                     "time_ms": ms})

    # 1. Loss on logits.
    loss_fns = {"ours": ours_loss, "naive": naive_loss,
                "cross-entropy difference": cross_entropy_difference_loss}
    for dtype in ("float32", "bfloat16"):
        full = jax.ShapeDtypeStruct((args.tokens, args.vocab), dtype)
        small = [random(rng, (args.time_tokens, args.time_vocab), dtype, 3.0) for _ in range(2)]
        for name, f in loss_fns.items():
            row("logits", name, dtype, temp_mib(f, full, full),
                median_ms(f, small, args.repeats))

    # 2. Fused head + loss vs materialised logits.
    def fused(h, w, t):
        return fused_head_distillation_loss(h, w, losses.DenseTargets(t),
                                            temperature=TEMPERATURE,
                                            chunk_size=args.chunk_size)[0]

    def materialised(h, w, t):
        return losses.distillation_loss(h @ w.T, t, temperature=TEMPERATURE)[0]

    def fused_topk(h, w, targets):
        return fused_head_distillation_loss(h, w, targets, temperature=TEMPERATURE,
                                            chunk_size=args.chunk_size)[0]

    for dtype in ("float32", "bfloat16"):
        shapes = (jax.ShapeDtypeStruct((1, args.tokens, args.hidden), dtype),
                  jax.ShapeDtypeStruct((args.head_vocab, args.hidden), dtype),
                  jax.ShapeDtypeStruct((1, args.tokens, args.head_vocab), dtype))
        small = (random(rng, (1, args.time_tokens, args.time_hidden), dtype),
                 random(rng, (args.time_head_vocab, args.time_hidden), dtype,
                        args.time_hidden ** -0.5),
                 random(rng, (1, args.time_tokens, args.time_head_vocab), dtype, 3.0))
        for name, f in (("fused", fused), ("materialised", materialised)):
            row("head", name, dtype, temp_mib(f, *shapes, argnums=(0, 1)),
                median_ms(f, small, args.repeats, argnums=(0, 1)))
        # Offline mode: top-k targets, so no [tokens, vocab] array exists anywhere.
        full_targets = jax.eval_shape(lambda t: topk_targets(t, args.topk), shapes[2])
        targets = topk_targets(small[2], args.topk)
        row("head", "fused, top-k targets", dtype,
            temp_mib(fused_topk, shapes[0], shapes[1], full_targets, argnums=(0, 1)),
            median_ms(fused_topk, (small[0], small[1], targets), args.repeats, argnums=(0, 1)))

    # 3. Sparse targets vs dense, on logits.
    full_logits = jax.ShapeDtypeStruct((args.tokens, args.vocab), jnp.float32)
    full_topk = jax.eval_shape(lambda t: topk_targets(t, args.topk), full_logits)
    full_sampled = jax.eval_shape(lambda: sampled_targets(rng, (args.tokens,), args.vocab,
                                                          args.samples))
    student, teacher = (random(rng, (args.time_tokens, args.time_vocab), jnp.float32, 3.0)
                        for _ in range(2))
    topk = topk_targets(teacher, args.topk)
    sampled = sampled_targets(rng, (args.time_tokens,), args.time_vocab, args.samples)
    for name, full_targets, targets in (("topk", full_topk, topk),
                                        ("sampled", full_sampled, sampled)):
        def sparse(s, tg):
            return losses.targets_distillation_loss(s, tg, temperature=TEMPERATURE)[0]
        row("sparse", name, "float32", temp_mib(sparse, full_logits, full_targets),
            median_ms(sparse, (student, targets), args.repeats))

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print(f"temp MiB: compile only at full sizes: logits {args.tokens}x{args.vocab}; head "
          f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.head_vocab}, chunk "
          f"{args.chunk_size}; sparse k={args.topk}, n={args.samples}")
    print(f"time ms: median of {args.repeats} runs at logits {args.time_tokens}x"
          f"{args.time_vocab}; head tokens {args.time_tokens}, hidden {args.time_hidden}, "
          f"vocab {args.time_head_vocab}")
    print(f"{'section':8} {'name':26} {'dtype':9} {'temp MiB':>10} {'time ms':>9}")
    for r in rows:
        print(f"{r['section']:8} {r['name']:26} {r['dtype']:9} {r['temp_mib']:10.1f} "
              f"{r['time_ms']:9.1f}")

    if jax.devices()[0].platform == "cpu":
        print("note: on CPU, XLA's float-normalization-bf16 pass computes bf16 dots and bf16 "
              "dynamic slices in f32, so the bf16 fused head also holds an f32 copy of the head "
              "and a 16-bit copy of the teacher logits (see pipeline/fused_head.py)")

    def get(section, name, dtype):
        return next(r for r in rows if (r["section"], r["name"], r["dtype"]) == (section, name,
                                                                                 dtype))

    ratios = {}
    for dtype in ("float32", "bfloat16"):
        ours, naive = get("logits", "ours", dtype), get("logits", "naive", dtype)
        ratios[f"logits {dtype}: naive/ours temp"] = naive["temp_mib"] / max(ours["temp_mib"], 1e-9)
        ratios[f"logits {dtype}: ours/naive time"] = ours["time_ms"] / naive["time_ms"]
    for dtype in ("float32", "bfloat16"):
        fused_row, mat = get("head", "fused", dtype), get("head", "materialised", dtype)
        ratios[f"head {dtype}: materialised/fused temp"] = mat["temp_mib"] / fused_row["temp_mib"]
        ratios[f"head {dtype}: fused/materialised time"] = fused_row["time_ms"] / mat["time_ms"]
        ratios[f"head {dtype}: materialised/fused top-k temp"] = (
            mat["temp_mib"] / get("head", "fused, top-k targets", dtype)["temp_mib"])
    dense = get("logits", "ours", "float32")
    for name in ("topk", "sampled"):
        ratios[f"sparse {name}: temp vs dense ours f32"] = (get("sparse", name, "float32")
                                                            ["temp_mib"] / max(dense["temp_mib"],
                                                                               1e-9))
    for key, value in ratios.items():
        print(f"{key:44} {value:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
