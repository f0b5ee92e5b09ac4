"""Top-k loss of a confident student against float64: prints the table of the issue's closing note.

    .venv/bin/python tests/topk_tail_table.py [--temperature 1] [--dtype float32]
        [--divergence forward_kl] [--json FILE]

The case is ``confident_student_case`` of tests/test_losses.py (vocab 1000, the student's logit
``top`` at id 0, the teacher's top 4 at 0.6/0.1/0.1/0.1 and a tail of 0.1), and the float64
figures are that file's references. Per token: the loss T² · div, and the gradient along the
tail (d loss / d s summed over the ids outside the top 4), ours vs float64, with the relative
error. test_topk_confident_student_matches_float64 asserts what this prints.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
from test_losses import (CONFIDENT_TOPS, confident_student_case, ref_buckets, ref_divergence,
                         ref_topk_grad, topk_divergence_and_grad)


def table(temperature: float, dtype: str, divergence: str) -> list[dict]:
    student, targets, s64 = confident_student_case(jnp.dtype(dtype))
    ids, logprobs, tail = (np.asarray(x) for x in targets)
    div, grad = topk_divergence_and_grad(student, targets, temperature, divergence)
    buckets = ref_buckets(s64, ids, logprobs, tail, temperature)[:2]
    want_div = ref_divergence(*buckets, divergence, 0.5)
    want_grad = ref_topk_grad(s64, ids, logprobs, tail, temperature, divergence)
    scale = temperature ** 2
    rows = []
    for i, top in enumerate(CONFIDENT_TOPS):
        loss, loss64 = scale * float(div[0, i]), scale * float(want_div[0, i])
        tail_grad = scale * float(grad[0, i, 4:].sum())
        tail_grad64 = scale * float(want_grad[0, i, 4:].sum())
        rows.append(dict(top=top, loss=loss, loss_f64=loss64,
                         loss_rel_err=abs(loss - loss64) / abs(loss64), tail_grad=tail_grad,
                         tail_grad_f64=tail_grad64,
                         tail_grad_rel_err=abs(tail_grad - tail_grad64) / abs(tail_grad64)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--divergence", default="forward_kl",
                        choices=("forward_kl", "reverse_kl", "jsd"))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    rows = table(args.temperature, args.dtype, args.divergence)
    print(f"top-k loss of a confident student, {args.divergence}, T={args.temperature}, "
          f"{args.dtype} logits, vocab 1000, k=4, teacher tail 0.1")
    print(f"{'top':>5} {'loss ours':>12} {'loss f64':>12} {'rel err':>9} "
          f"{'tail grad ours':>15} {'tail grad f64':>15} {'rel err':>9}")
    for r in rows:
        print(f"{r['top']:5.0f} {r['loss']:12.6f} {r['loss_f64']:12.6f} {r['loss_rel_err']:9.1e} "
              f"{r['tail_grad']:15.6e} {r['tail_grad_f64']:15.6e} {r['tail_grad_rel_err']:9.1e}")
    print(f"worst relative error: loss {max(r['loss_rel_err'] for r in rows):.1e}, "
          f"tail gradient {max(r['tail_grad_rel_err'] for r in rows):.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
