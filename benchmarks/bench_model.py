"""Forward and forward+backward throughput of the Llama-family model, float32 vs bfloat16.

Times a jitted forward (logits) and a jitted forward+backward (cross-entropy on random labels,
gradients for every parameter) of a ~100M-parameter Llama config on the local devices (CPU by
default), for float32 and bfloat16 parameters, side by side in one run, and the same
forward+backward on rows packed with ``--documents`` documents (``segment_ids``: attention kept
inside each, RoPE positions per document), the cost of packed-document masking. Tracks
regressions in pipeline/models/llama/model.py; never asserted by a test.

    python benchmarks/bench_model.py                        # ~100M params, batch 2 x seq 256
    python benchmarks/bench_model.py --layers 2 --seq 64    # quick look
    python benchmarks/bench_model.py --json out.json

Model FLOPs per token: forward 2*N + 4*layers*seq*(heads*head_dim) (the matmuls with the
N non-embedding-lookup weights, incl. the output head, plus scores and weighted values over the
full seq x seq square); forward+backward 3x that (pipeline/hardware.py). MFU: those FLOPs per
second over the device's bf16 peak, "n/a" where pipeline/hardware.py knows no peak (a CPU).
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

from pipeline import hardware
from pipeline.models.llama import Llama, LlamaConfig

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model shape options (defaults: the ~100M config the benchmarks share)."""
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers")
    parser.add_argument("--heads", type=int, default=12, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    parser.add_argument("--intermediate", type=int, default=2048, help="MLP size")
    parser.add_argument("--untied", action="store_true", help="separate output head")


def model_config(args, **fields) -> LlamaConfig:
    """The ``LlamaConfig`` of :func:`add_model_args`' options (``fields``: any others)."""
    return LlamaConfig(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, tie_word_embeddings=not args.untied, **fields)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (the fastest counts)")
    parser.add_argument("--dtypes", default="f32,bf16", help="comma list of f32, bf16")
    parser.add_argument("--documents", type=int, default=4,
                        help="also time fwd+bwd on rows packed with this many equal documents "
                             "(segment_ids: attention inside each, positions per document); "
                             "0: not")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return parser.parse_args()


def _time(fn, *args, repeats):
    """(first-call seconds incl. compile, fastest of `repeats` later calls in seconds).

    The fastest rather than the median: on a shared machine the slower runs measure the
    neighbours, not the model."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return compile_s, min(times)


def main():
    args = parse_args()
    config = model_config(args)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones((args.batch, args.seq), jnp.int32)
    tokens = args.batch * args.seq
    # Document d of a row covers tokens [d seq / D, (d + 1) seq / D), numbered from 1.
    segments = jnp.broadcast_to(
        1 + jnp.arange(args.seq) * max(args.documents, 1) // args.seq, (args.batch, args.seq))

    @jax.jit
    def forward(graphdef, params):
        return nnx.merge(graphdef, params)(ids, mask).logits

    def forward_backward(segment_ids):
        @jax.jit
        def run(graphdef, params):
            def loss(p):
                logits = nnx.merge(graphdef, p)(ids, mask, segment_ids=segment_ids).logits
                picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
                return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)
            return jax.grad(loss)(params)
        return run

    passes = [("forward", forward, 1), ("fwd+bwd", forward_backward(None), 3)]
    if args.documents:
        passes.append(("fwd+bwd seg", forward_backward(segments), 3))

    rows = []
    num_params = None
    chip = hardware.chip_of(jax.devices()[0].device_kind)  # the one device the passes run on
    for dtype_name in args.dtypes.split(","):
        model = Llama(config, dtype=DTYPES[dtype_name], rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        num_params = sum(x.size for x in jax.tree.leaves(params))
        fwd_flops = hardware.forward_flops_per_token(config, args.seq) * tokens
        for pass_name, fn, forwards in passes:
            flops = forwards * fwd_flops  # the full square, whatever the segments mask
            compile_s, step_s = _time(fn, graphdef, params, repeats=args.repeats)
            rows.append(dict(dtype=dtype_name, pass_=pass_name, compile_s=compile_s,
                             step_ms=1e3 * step_s, tokens_per_s=tokens / step_s,
                             gflops_per_s=flops / step_s / 1e9,
                             mfu=hardware.mfu(flops / tokens, tokens / step_s, chip, 1)))
        del model, params

    print(f"model: {num_params / 1e6:.1f}M params (vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.heads}/{args.kv_heads} heads, mlp {args.intermediate}, "
          f"{'untied' if args.untied else 'tied'}); batch {args.batch} x seq {args.seq} = "
          f"{tokens} tokens/step; {jax.device_count()} {jax.default_backend()} device(s)")
    if args.documents:
        print(f"fwd+bwd seg: {args.documents} documents of {args.seq // args.documents} tokens "
              f"a row, with segment_ids")
    print(f"{'dtype':6} {'pass':11} {'compile s':>10} {'step ms':>10} {'tokens/s':>10} "
          f"{'GFLOP/s':>9} {'MFU':>6}")
    for r in rows:
        print(f"{r['dtype']:6} {r['pass_']:11} {r['compile_s']:10.1f} {r['step_ms']:10.1f} "
              f"{r['tokens_per_s']:10.1f} {r['gflops_per_s']:9.1f} "
              f"{hardware.format_mfu(r['mfu']):>6}")
    by = {(r["dtype"], r["pass_"]): r for r in rows}
    headlines = {}
    for dtype_name in args.dtypes.split(","):
        ratio = by[dtype_name, "fwd+bwd"]["step_ms"] / by[dtype_name, "forward"]["step_ms"]
        headlines[f"{dtype_name}_fwd_bwd_over_fwd_time"] = ratio
        print(f"{dtype_name}: fwd+bwd / forward step time = {ratio:.2f} (model FLOPs ratio 3)")
        if args.documents:
            ratio = (by[dtype_name, "fwd+bwd seg"]["tokens_per_s"]
                     / by[dtype_name, "fwd+bwd"]["tokens_per_s"])
            headlines[f"{dtype_name}_segments_over_plain_tokens_per_s"] = ratio
            print(f"{dtype_name}: fwd+bwd tokens/s with segment ids / without = {ratio:.2f}")
    if {"f32", "bf16"} <= set(args.dtypes.split(",")):
        for pass_name in ("forward", "fwd+bwd"):
            ratio = by["bf16", pass_name]["tokens_per_s"] / by["f32", pass_name]["tokens_per_s"]
            headlines[f"bf16_over_f32_tokens_per_s_{pass_name}"] = ratio
            print(f"bf16 / f32 tokens/s, {pass_name}: {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), num_params=num_params, machine=platform.machine(),
                           backend=jax.default_backend(), devices=jax.device_count(),
                           rows=[{**r, "pass": r.pop("pass_")} for r in rows],
                           headlines=headlines), f, indent=2)


if __name__ == "__main__":
    main()
