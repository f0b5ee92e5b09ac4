"""XLA temp memory and time of the top-k bucket loss: ours vs the pre-rewrite formula vs naive jnp.

The k+1-bucket forward KL of top-k teacher targets (T² · mean over tokens), three ways, side by
side in one run, in float32 and bfloat16, forward only and forward + backward
(``jax.value_and_grad``):

- ours: ``pipeline.losses.topk_bucket_logprobs`` (the student's tail summed over the ids
  outside the top k, exact for a confident student);
- pre-rewrite: the formula kdpipe used before the exact tail (commit 46d0da8's
  ``_logprobs_at``, copied below as ``pre_rewrite_logprobs_at``): the tail as
  ``log(1 − Σ_j q_j)``, floored at float32 epsilon of the mass, so not exact;
- naive: ``jax.nn.log_softmax`` over the vocabulary and a masked logsumexp over a
  ``[tokens, vocab]`` membership mask, differentiated by autodiff.

Memory is ``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`` of the
timed program; time is the best of ``--repeats`` runs, the three taken in turns.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline import losses

TEMPERATURE = 2.0

# --------------------------------------------------------------------------- pre-rewrite baseline
# Commit 46d0da8's pipeline/losses.py, unchanged but for the names.

_PRE_REWRITE_TAIL_FLOOR = float(jnp.finfo(jnp.float32).eps)


def _pre_rewrite_scaled(logits, temperature):
    return logits.astype(jnp.float32) / temperature


def _pre_rewrite_log1mexp(x):
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _pre_rewrite_scatter_add_last(dense, ids, updates):
    lead = dense.shape[:-1]
    flat = jax.vmap(lambda row, i, u: row.at[i].add(u))(
        dense.reshape(-1, dense.shape[-1]), ids.reshape(-1, ids.shape[-1]),
        updates.reshape(-1, updates.shape[-1]))
    return flat.reshape(*lead, dense.shape[-1])


@jax.custom_vjp
def pre_rewrite_logprobs_at(logits, ids, has_tail, temperature):
    return _pre_rewrite_fwd(logits, ids, has_tail, temperature)[0]


def _pre_rewrite_fwd(logits, ids, has_tail, temperature):
    z = _pre_rewrite_scaled(logits, temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    at_ids = jnp.take_along_axis(z, ids, axis=-1) - lse[..., None]
    covered = jax.nn.logsumexp(at_ids, axis=-1)
    tail_active = has_tail & (covered < -_PRE_REWRITE_TAIL_FLOOR)
    floor = jnp.where(has_tail, math.log(_PRE_REWRITE_TAIL_FLOOR), -jnp.inf)
    tail = jnp.where(tail_active, _pre_rewrite_log1mexp(jnp.where(tail_active, covered, -1.0)),
                     floor)
    out = jnp.concatenate([at_ids, tail[..., None]], axis=-1)
    return out, (logits, ids, tail_active, temperature, lse, at_ids, tail)


def _pre_rewrite_bwd(residuals, cotangent):
    logits, ids, tail_active, temperature, lse, at_ids, tail = residuals
    a_ids, a_tail = cotangent[..., :-1], jnp.where(tail_active, cotangent[..., -1], 0.0)
    total = jnp.sum(a_ids, axis=-1) + a_tail
    tail_coef = jnp.where(tail_active, a_tail * jnp.exp(-jnp.where(tail_active, tail, 0.0)), 0.0)
    q = jnp.exp(_pre_rewrite_scaled(logits, temperature) - lse[..., None])
    dense = q * ((tail_coef - total) / temperature)[..., None]
    sparse = (a_ids - jnp.asarray(tail_coef)[..., None] * jnp.exp(at_ids)) / temperature
    grad = _pre_rewrite_scatter_add_last(dense, ids, sparse)
    return grad.astype(logits.dtype), None, None, jnp.zeros_like(temperature)


pre_rewrite_logprobs_at.defvjp(_pre_rewrite_fwd, _pre_rewrite_bwd)

# --------------------------------------------------------------------------- the three losses


def _bucket_kl(student_buckets, targets):
    teacher = jnp.concatenate([targets.logprobs, targets.tail_logmass[..., None]], axis=-1)
    kl = losses.token_divergence(student_buckets, teacher, "forward_kl")
    return TEMPERATURE ** 2 * jnp.mean(kl)


def ours(student, targets):
    return _bucket_kl(losses.topk_bucket_logprobs(student, targets, TEMPERATURE)[0], targets)


def pre_rewrite(student, targets):
    buckets = pre_rewrite_logprobs_at(student, targets.ids, targets.tail_logmass > -jnp.inf,
                                      jnp.float32(TEMPERATURE))
    return _bucket_kl(buckets, targets)


def naive(student, targets):
    log_q = jax.nn.log_softmax(student.astype(jnp.float32) / TEMPERATURE)
    at_ids = jnp.take_along_axis(log_q, targets.ids, axis=-1)
    outside = jax.vmap(lambda row, i: row.at[i].set(False))(
        jnp.ones(log_q.shape, bool), targets.ids)
    tail = jax.nn.logsumexp(jnp.where(outside, log_q, -jnp.inf), axis=-1)
    return _bucket_kl(jnp.concatenate([at_ids, tail[..., None]], axis=-1), targets)


FUNCTIONS = {"ours": ours, "pre-rewrite": pre_rewrite, "naive": naive}
MODES = {"forward": lambda f: f,
         "value_and_grad": lambda f: jax.value_and_grad(f)}


def side_by_side(args, student, targets, differentiate):
    """``{name: (temp MiB, best ms)}`` of each function, compiled at the size of the inputs."""
    compiled = {name: jax.jit(differentiate(f)).lower(student, targets).compile()
                for name, f in FUNCTIONS.items()}
    for step in compiled.values():
        jax.block_until_ready(step(student, targets))
    times = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name, step in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(step(student, targets))
            times[name].append(time.perf_counter() - start)
    return {name: (step.memory_analysis().temp_size_in_bytes / 2 ** 20, 1e3 * min(times[name]))
            for name, step in compiled.items()}


def make_inputs(args, dtype):
    rng = np.random.default_rng(0)
    shape = (args.tokens, args.vocab)
    student = jnp.asarray(rng.standard_normal(size=shape, dtype=np.float32) * 3.0, dtype)
    teacher = jnp.asarray(rng.standard_normal(size=shape, dtype=np.float32) * 3.0)
    logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(teacher / TEMPERATURE), args.k)
    targets = losses.TopKTargets(ids, logprobs, jnp.log1p(-jnp.exp(logprobs).sum(-1)))
    return student, targets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    rows = []
    for dtype in ("float32", "bfloat16"):
        student, targets = make_inputs(args, dtype)
        for mode, differentiate in MODES.items():
            figures = side_by_side(args, student, targets, differentiate)
            rows.append({"dtype": dtype, "mode": mode,
                         **{f"{name}_{unit}": value for name, pair in figures.items()
                            for unit, value in zip(("temp_mib", "ms"), pair)}})
        del student, targets

    print(f"top-k bucket KL at [{args.tokens}, {args.vocab}], k={args.k}, T={TEMPERATURE}: "
          f"XLA temp MiB and best of {args.repeats} ms, taken in turns")
    names = list(FUNCTIONS)
    print(f"{'dtype':9} {'mode':15}" + "".join(f" {n + ' MiB':>15}" for n in names)
          + "".join(f" {n + ' ms':>14}" for n in names))
    for r in rows:
        print(f"{r['dtype']:9} {r['mode']:15}"
              + "".join(f" {r[n + '_temp_mib']:15.1f}" for n in names)
              + "".join(f" {r[n + '_ms']:14.1f}" for n in names))
    ratios = {}
    for other in ("pre-rewrite", "naive"):
        ratios[f"ours/{other} time, worst"] = max(r["ours_ms"] / r[f"{other}_ms"] for r in rows)
        ratios[f"ours-{other} temp MiB, worst"] = max(
            r["ours_temp_mib"] - r[f"{other}_temp_mib"] for r in rows)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
