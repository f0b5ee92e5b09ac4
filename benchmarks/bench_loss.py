"""XLA temp memory and time of kdpipe's distillation losses vs the plain formulas.

Three comparisons, side by side in one run:

1. the loss on logits ``[batch, seq, vocab]``: ``pipeline.losses.distillation_loss`` vs the naive
   jnp formula (softmax / log_softmax / sum, autodiff), with one long sequence (batch 1, as at
   long context) and with ``--batch`` sequences of the same total token count, under
   ``jax.grad`` and ``jax.value_and_grad``, in float32 and bfloat16. Each row gives both
   functions' best time of ``--repeats`` runs, taken in turns, and XLA temp memory at the
   same size;
2. the fused head + loss (``pipeline.losses.fused_head``) vs materialising ``hidden @ head.T``,
   gradients w.r.t. hidden states and head;
3. the sparse-target losses (top-k, sampled) vs the dense loss.

Memory is ``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`` (compile
only). Comparison 1 times the size it measures (``--tokens``, ``--vocab``; ``--full`` is 8192 x
32768, which needs about 8 GiB of RAM: run it alone, ``--sections logits``). Comparisons 2 and
3 take their memory at ``--mem-tokens`` and the head/sparse sizes (compile only) and time at
``--tokens``, ``--vocab``, ``--time-head-vocab`` and ``--time-hidden``.
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
from pipeline.losses import fused_head_distillation_loss

TEMPERATURE = 4.0


def naive_loss(student, teacher):
    t = teacher.astype(jnp.float32) / TEMPERATURE
    s = student.astype(jnp.float32) / TEMPERATURE
    p = jax.nn.softmax(t)
    kl = jnp.sum(p * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s)), axis=-1)
    return TEMPERATURE ** 2 * jnp.mean(kl)


def ours_loss(student, teacher):
    return losses.distillation_loss(student, teacher, temperature=TEMPERATURE)[0]


def temp_mib(f, *shapes, argnums=0, differentiate=jax.value_and_grad):
    compiled = jax.jit(differentiate(f, argnums)).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


def median_ms(f, args, repeats, argnums=0, differentiate=jax.value_and_grad):
    step = jax.jit(differentiate(f, argnums))
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def side_by_side(functions, args, repeats, differentiate):
    """``{name: (temp MiB, best ms)}`` of each compiled function at the size of ``args``.

    The functions run in turns, so that on a shared machine both see the same load.
    """
    compiled = {name: jax.jit(differentiate(f)).lower(*args).compile()
                for name, f in functions.items()}
    times = {name: [] for name in functions}
    for step in compiled.values():
        jax.block_until_ready(step(*args))
    for _ in range(repeats):
        for name, step in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times[name].append(time.perf_counter() - start)
    return {name: (step.memory_analysis().temp_size_in_bytes / 2 ** 20, 1e3 * min(times[name]))
            for name, step in compiled.items()}


def random(rng, shape, dtype, scale=1.0):
    # float32 draws: at --full a float64 draw alone would take 2 GiB per array.
    return jnp.asarray(rng.standard_normal(size=shape, dtype=np.float32) * np.float32(scale),
                       dtype)


def topk_targets(teacher, k):
    log_p = jax.nn.log_softmax(teacher.astype(jnp.float32) / TEMPERATURE)
    logprobs, ids = jax.lax.top_k(log_p, k)
    return losses.TopKTargets(ids, logprobs, jnp.log1p(-jnp.exp(logprobs).sum(-1)))


def sampled_targets(rng, tokens_shape, vocab, n):
    ids = jnp.asarray(rng.integers(0, vocab, tokens_shape + (n,)), jnp.int32)
    return losses.SampledTargets(ids, jnp.ones(ids.shape, jnp.float32),
                                 jnp.ones(tokens_shape, jnp.float32))


DIFFERENTIATIONS = {"grad": jax.grad, "value_and_grad": jax.value_and_grad}


def logits_rows(args, rng):
    """Comparison 1: one row per (shape, dtype, differentiation), ours and naive side by side."""
    shapes = [(1, args.tokens, args.vocab), (args.batch, args.tokens // args.batch, args.vocab)]
    rows = []
    for shape in shapes:
        for dtype in ("float32", "bfloat16"):
            # One pair of arrays at a time: at --full they are 1-2 GiB each.
            logits = [random(rng, shape, dtype, 3.0) for _ in range(2)]
            for mode, differentiate in DIFFERENTIATIONS.items():
                row = {"shape": list(shape), "dtype": dtype, "mode": mode}
                figures = side_by_side({"ours": ours_loss, "naive": naive_loss}, logits,
                                       args.repeats, differentiate)
                for name, (mib, ms) in figures.items():
                    row[f"{name}_temp_mib"], row[f"{name}_ms"] = mib, ms
                row["time_ratio"] = row["ours_ms"] / row["naive_ms"]
                rows.append(row)
                print(f"  {'x'.join(map(str, shape))} {dtype} {mode}: ours {row['ours_ms']:.0f} ms"
                      f", naive {row['naive_ms']:.0f} ms", flush=True)
            del logits
    return rows


def print_logits_table(args, rows):
    print(f"loss on logits: forward + backward, best of {args.repeats} runs taken in turns; "
          f"temp = XLA temp of the same program")
    print(f"{'shape':18} {'dtype':9} {'mode':15} {'ours ms':>9} {'naive ms':>9} {'ratio':>6} "
          f"{'ours MiB':>9} {'naive MiB':>9}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):18} {r['dtype']:9} {r['mode']:15} "
              f"{r['ours_ms']:9.1f} {r['naive_ms']:9.1f} {r['time_ratio']:6.2f} "
              f"{r['ours_temp_mib']:9.1f} {r['naive_temp_mib']:9.1f}")


def logits_ratios(rows):
    ratios = {}
    for batch_one in (True, False):
        group = [r for r in rows if (r["shape"][0] == 1) == batch_one]
        label = "batch 1" if batch_one else f"batch {group[0]['shape'][0]}"
        ratios[f"logits {label}: ours/naive time, worst row"] = max(r["time_ratio"]
                                                                   for r in group)
        ratios[f"logits {label}: ours/naive time, mean"] = statistics.mean(r["time_ratio"]
                                                                         for r in group)
        # A difference, not a ratio: the naive gradient can need no temp at all.
        ratios[f"logits {label}: ours-naive temp MiB, worst row"] = max(
            r["ours_temp_mib"] - r["naive_temp_mib"] for r in group)
    return ratios


def other_rows(args, rng):
    """Comparisons 2 and 3: memory at --mem-tokens (compile only), time at --tokens."""
    rows = []

    def row(section, name, dtype, mib, ms):
        rows.append({"section": section, "name": name, "dtype": dtype, "temp_mib": mib,
                     "time_ms": ms})

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
        shapes = (jax.ShapeDtypeStruct((1, args.mem_tokens, args.hidden), dtype),
                  jax.ShapeDtypeStruct((args.head_vocab, args.hidden), dtype),
                  jax.ShapeDtypeStruct((1, args.mem_tokens, args.head_vocab), dtype))
        small = (random(rng, (1, args.tokens, args.time_hidden), dtype),
                 random(rng, (args.time_head_vocab, args.time_hidden), dtype,
                        args.time_hidden ** -0.5),
                 random(rng, (1, args.tokens, args.time_head_vocab), dtype, 3.0))
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
    full_logits = jax.ShapeDtypeStruct((args.mem_tokens, args.vocab), jnp.float32)
    full_topk = jax.eval_shape(lambda t: topk_targets(t, args.topk), full_logits)
    full_sampled = jax.eval_shape(lambda: sampled_targets(rng, (args.mem_tokens,), args.vocab,
                                                          args.samples))
    student, teacher = (random(rng, (args.tokens, args.vocab), jnp.float32, 3.0)
                        for _ in range(2))
    row("sparse", "dense", "float32", temp_mib(ours_loss, full_logits, full_logits),
        median_ms(ours_loss, (student, teacher), args.repeats))
    topk = topk_targets(teacher, args.topk)
    sampled = sampled_targets(rng, (args.tokens,), args.vocab, args.samples)
    for name, full_targets, targets in (("topk", full_topk, topk),
                                        ("sampled", full_sampled, sampled)):
        def sparse(s, tg):
            return losses.targets_distillation_loss(s, tg, temperature=TEMPERATURE)[0]
        row("sparse", name, "float32", temp_mib(sparse, full_logits, full_targets),
            median_ms(sparse, (student, targets), args.repeats))
    return rows


def print_other_table(args, rows):
    print(f"temp MiB: compile only, value_and_grad: head tokens {args.mem_tokens}, hidden "
          f"{args.hidden}, vocab {args.head_vocab}, chunk {args.chunk_size}; sparse "
          f"{args.mem_tokens}x{args.vocab}, k={args.topk}, n={args.samples}")
    print(f"time ms: median of {args.repeats} runs at head tokens {args.tokens}, hidden "
          f"{args.time_hidden}, vocab {args.time_head_vocab}; sparse {args.tokens}x{args.vocab}")
    print(f"{'section':8} {'name':26} {'dtype':9} {'temp MiB':>10} {'time ms':>9}")
    for r in rows:
        print(f"{r['section']:8} {r['name']:26} {r['dtype']:9} {r['temp_mib']:10.1f} "
              f"{r['time_ms']:9.1f}")
    if jax.devices()[0].platform == "cpu":
        print("note: on CPU, XLA's float-normalization-bf16 pass computes bf16 dots and bf16 "
              "dynamic slices in f32, so the bf16 fused head also holds an f32 copy of the head "
              "and a 16-bit copy of the teacher logits (see pipeline/losses/fused_head.py)")


def other_ratios(rows):
    def get(section, name, dtype):
        return next(r for r in rows if (r["section"], r["name"], r["dtype"]) == (section, name,
                                                                                 dtype))

    ratios = {}
    for dtype in ("float32", "bfloat16"):
        fused_row, mat = get("head", "fused", dtype), get("head", "materialised", dtype)
        ratios[f"head {dtype}: materialised/fused temp"] = mat["temp_mib"] / fused_row["temp_mib"]
        ratios[f"head {dtype}: fused/materialised time"] = fused_row["time_ms"] / mat["time_ms"]
        ratios[f"head {dtype}: materialised/fused top-k temp"] = (
            mat["temp_mib"] / get("head", "fused, top-k targets", dtype)["temp_mib"])
    dense = get("sparse", "dense", "float32")
    for name in ("topk", "sampled"):
        ratios[f"sparse {name}: temp vs dense ours f32"] = (get("sparse", name, "float32")
                                                            ["temp_mib"] / max(dense["temp_mib"],
                                                                               1e-9))
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024,
                        help="tokens per row of comparison 1 (and timed size of 2 and 3)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocab of comparisons 1 and 3")
    parser.add_argument("--batch", type=int, default=4,
                        help="the batch > 1 rows: [batch, tokens / batch, vocab]")
    parser.add_argument("--full", action="store_true",
                        help="comparison 1 at 8192 x 32768 (about 8 GiB of RAM)")
    parser.add_argument("--sections", default="logits,head,sparse",
                        help="comma-separated subset of logits,head,sparse")
    parser.add_argument("--mem-tokens", type=int, default=8192,
                        help="tokens of the compile-only memory of comparisons 2 and 3")
    parser.add_argument("--head-vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--time-head-vocab", type=int, default=32768)
    parser.add_argument("--time-hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.full:
        args.tokens, args.vocab = 8192, 32768
    sections = set(args.sections.split(","))
    if not sections <= {"logits", "head", "sparse"}:
        parser.error(f"--sections: expected a subset of logits,head,sparse, got {args.sections}")
    if args.batch < 2 or args.tokens % args.batch:
        parser.error(f"--batch: expected an int >= 2 that divides --tokens {args.tokens}, got "
                     f"{args.batch}")
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    logits = logits_rows(args, rng) if "logits" in sections else []
    others = other_rows(args, rng) if sections & {"head", "sparse"} else []
    ratios = {}
    if others:
        print_other_table(args, others)
        ratios.update(other_ratios(others))
    if logits:
        print_logits_table(args, logits)
        ratios.update(logits_ratios(logits))
    for key, value in ratios.items():
        print(f"{key:48} {value:8.2f}" + ("" if "MiB" in key else "x"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "logits": logits, "rows": others, "ratios": ratios},
                      f, indent=2)


if __name__ == "__main__":
    main()
