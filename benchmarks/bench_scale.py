"""The Llama-3.2-1B student's distillation step at scale, compiled only, on virtual CPU devices.

Nothing is allocated: the train state and the batch are abstract (``jax.eval_shape``,
``jax.ShapeDtypeStruct``) and the step is lowered and compiled, never run. It is the step a run
takes (``pipeline.step``'s jitted update, student state donated) with the static arguments
``pipeline.train.step_options`` draws from ``configs/tpu-v4-llama8b-to-1b.yaml`` (top-k 64
cached targets, fused head ``train.logits_chunk_size`` 256, hard labels), the student
initialised at Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 key/value heads,
head_dim 64, MLP 8192, vocab 128256, tied embeddings) computing in bfloat16 with float32
parameters and AdamW state, laid out by ``pipeline.models.sharding`` on an fsdp mesh of N
devices, the batch split over them. ``train.grad_accum_steps`` is 1: the per-device batch
here is one microbatch (accumulation multiplies the batch, not the memory).

Per device, from XLA's ``memory_analysis()``: argument, output and temp bytes, and what the
step needs (argument + output + temp - donated aliases); ``cost_analysis()``'s FLOPs, which
count a while loop's body once, so for scanned layers (and blockwise attention's block loop)
they are one iteration's work, not the step's. Then the largest per-device batch (1, 2, 4, ...)
whose need fits 32 GiB (TPU v4) and 16 GiB (TPU v5e).

(c) Each row projected onto each chip's peak (``pipeline.hardware``): since XLA's count of a
step with loops is one iteration's, the whole step's FLOPs per device come from the formula:
model FLOPs ``6 N + 12 L H Q T`` per token (PaLM appendix B) and the hardware FLOPs XLA would
run, the model's plus what the remat policy recomputes. The step can take no less than
hardware FLOPs / peak (a lower bound on its time: memory traffic and communication are not in
it), and then runs at MFU = model / hardware FLOPs, the most that policy allows. Attention is
counted over the whole ``T x T`` square, as PaLM counts it and the xla kernel computes it; a
kernel that skips the blocks causality masks (blockwise, splash) does up to half that term
less (the line under the table gives its share).

Layers: per-device temp of the scanned step (blockwise attention) at two depths
(``--layer-growth 16 32``) for each remat policy, its growth per layer less the one
activation ``full`` keeps per layer (a layer's input), in units of a layer's float32
parameters on one device (the size of its gradient, and of its update). The last lines:
compile seconds of the step at two depths, looped and scanned (``--compile-layers 4 32``), and
the headline ratios.

    XLA_FLAGS is set here before JAX is imported; run it as a script:
    python benchmarks/bench_scale.py                   # the default subset, a few minutes
    python benchmarks/bench_scale.py --grid            # every attention x scan x remat
    python benchmarks/bench_scale.py --seq 8192 --devices 8 --json out.json
    python benchmarks/bench_scale.py --compile-layers 4 32
    python benchmarks/bench_scale.py --layer-growth     # skip the 16 vs 32 layers table
    python benchmarks/bench_scale.py --teacher          # the teacher's cache fill step instead

Offload remat is skipped: the CPU backend has no pinned host memory (the model refuses it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

GIB = 2**30
CHIPS = {"v4": 32 * GIB, "v5e": 16 * GIB}
ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG = ROOT / "configs" / "tpu-v4-llama8b-to-1b.yaml"
# Llama-3.2-1B (its config.json), initialised rather than loaded.
STUDENT_1B = dict(path=None, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                  max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                  dtype="bfloat16", param_dtype="float32")
TODAY = ("xla", False, "none")  # attention, scan_layers, remat: the defaults of today's runs
# The chips each row is projected onto (pipeline.hardware.CHIPS).
PROJECTED = {"v4": "TPU v4", "v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e",
             "A100": "A100", "H100": "H100 SXM", "H200": "H200 SXM"}  # column: chip
MIB = 2**20


def _args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096])
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--grid", action="store_true",
                        help="every attention x scan_layers x remat (default: today's model, "
                             "and blockwise + scan + full remat)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="largest per-device batch tried")
    parser.add_argument("--compile-layers", type=int, nargs=2, metavar=("SHALLOW", "DEEP"),
                        help="also compare the step's compile seconds at two depths, looped "
                             "and scanned (e.g. 4 32; the looped 32-layer step takes minutes)")
    parser.add_argument("--layer-growth", type=int, nargs="*", default=[16, 32],
                        metavar="LAYERS", help="per-device temp of the scanned step at these "
                        "depths for each remat policy (none: skip)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--teacher", nargs="*", metavar="NAME",
                        help="the teacher section instead (benchmarks/scale_teacher.py: the "
                             "cache fill step of Llama-3.1-8B on 4 devices and Llama-3.1-70B "
                             "on 16, at the first --seq); names: only those teachers")
    parser.add_argument("--tpu", choices=("v5e", "v4"),
                        help="with --teacher: compile for this TPU's slices by its own compiler "
                             "(libtpu: pip install 'jax[tpu]'), deviceless, instead of XLA:CPU "
                             "on virtual devices, which converts every bfloat16 matmul's "
                             "operands to float32 and holds those copies")
    args = parser.parse_args(argv)
    if args.tpu and args.teacher is None:
        parser.error("--tpu: only with --teacher (the student's section compiles for CPU)")
    if len(args.layer_growth) == 1 or any(depth < 1 for depth in args.layer_growth):
        parser.error(f"--layer-growth: expected two or more depths >= 1 (none: skip the "
                     f"table), got {args.layer_growth}")
    return args


ARGS = _args() if __name__ == "__main__" else None
if ARGS and ARGS.tpu:  # libtpu compiles for a described slice; JAX itself runs on the CPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
                           f"count={max(ARGS.devices + [16]) if ARGS else 8}"
                           ).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.tree_util import keystr  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.models.build import build_model  # noqa: E402
from pipeline.models.sharding import BATCH_SPEC, make_mesh, state_shardings  # noqa: E402
from pipeline.optim import build_optimizer  # noqa: E402
from pipeline import hardware  # noqa: E402
from pipeline.models.registry import config_from_hf  # noqa: E402
from pipeline.step import TrainState, lower_distillation_step  # noqa: E402
from pipeline.train import step_options  # noqa: E402

PEAKS = {chip.name: chip.peak_flops for _, chip in hardware.CHIPS}


def run_config(seq: int, attention: str, scan_layers: bool, remat: str, layers: int = 16):
    """The shipped TPU config with the 1B student initialised at ``layers`` layers."""
    student = {**STUDENT_1B, "num_hidden_layers": layers, "attention": attention,
               "scan_layers": scan_layers, "remat": remat}
    overrides = [f"model.student={json.dumps(student)}", f"data.seq_len={seq}",
                 "train.grad_accum_steps=1"]
    return load_config(RUN_CONFIG, overrides)


def abstract_state(config, mesh) -> TrainState:
    """The student's train state, abstract, with the shardings a run gives it: parameters by
    ``pipeline.models.sharding``'s rules, the optimizer state following them."""
    spec, vocab = config.model.student, config.model.student.vocab_size
    tx = build_optimizer(config.optimizer, config.train.steps)

    def create():  # as pipeline.student_state builds it: on the mesh, by the rules
        state = TrainState.create(build_model(spec, vocab, config.train.seed, mesh), tx)
        shardings = state_shardings(state.params, mesh)
        by_path = {keystr(path): sharding
                   for path, sharding in jax.tree_util.tree_leaves_with_path(shardings)}

        def follow(path, leaf):  # optax's moments: laid out as their parameter, as tx.init of
            key = keystr(path)   # sharded parameters gives them in a run
            ends = [k for k in by_path if key.endswith(k)]
            return (jax.lax.with_sharding_constraint(leaf, by_path[max(ends, key=len)])
                    if ends else leaf)

        params = jax.lax.with_sharding_constraint(state.params, shardings)
        opt_state = jax.tree_util.tree_map_with_path(follow, tx.init(params))
        return state.replace(params=params, opt_state=opt_state)

    # The layout XLA gives the created state (the optimizer state follows the parameters, as
    # a run's tx.init of sharded parameters does), read off the creation compiled, not run.
    create = jax.jit(create)
    shardings = create.lower().compile().output_shardings
    return jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(
        shape.shape, shape.dtype, sharding=sharding), jax.eval_shape(create), shardings)


def abstract_batch(batch: int, seq: int, k: int, mesh) -> dict:
    """A batch of top-k cached targets as the cache reader gives it, split over the mesh."""
    sharding = NamedSharding(mesh, BATCH_SPEC)

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return {"input_ids": array((batch, seq), jnp.int32),
            "attention_mask": array((batch, seq), jnp.int32),
            "labels": array((batch, seq), jnp.int32),
            "teacher_topk_ids": array((batch, seq, k), jnp.int32),
            "teacher_topk_logprobs": array((batch, seq, k), jnp.float32),
            "teacher_tail_logmass": array((batch, seq), jnp.float32)}


def student(config, devices: int) -> tuple:
    """An fsdp mesh of the first ``devices`` devices and the abstract state laid out on it."""
    mesh = make_mesh(fsdp=devices, devices=jax.devices()[:devices])
    return mesh, abstract_state(config, mesh)


def compile_step(config, mesh, state, per_device_batch: int) -> dict:
    """Lowers and compiles the step; XLA's per-device figures and the compile seconds."""
    batch = abstract_batch(per_device_batch * mesh.size, config.data.seq_len, config.cache.k,
                           mesh)
    options = step_options(config, config.model.student.vocab_size)
    start = time.perf_counter()
    compiled = lower_distillation_step(state, batch, None, **options).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    need = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return dict(args=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
                temp=memory.temp_size_in_bytes, alias=memory.alias_size_in_bytes, need=need,
                flops=float(cost.get("flops", float("nan"))), compile_s=seconds)


def architecture(config):
    """The student's model config (``pipeline.models.llama.LlamaConfig``) in ``config``."""
    return config_from_hf(config.model.student.hf_config(config.model.student.vocab_size))


def formula_flops(config, remat: str) -> dict:
    """The step's FLOPs per device at per-device batch 1 by formula (``pipeline.hardware``):
    the model's (``6 N + 12 L H Q T`` a token) and the hardware's (plus what ``remat``
    recomputes)."""
    arch, seq = architecture(config), config.data.seq_len
    model = hardware.train_flops_per_token(arch, seq) * seq
    return dict(model_flops=model,
                hardware_flops=model + hardware.recompute_flops_per_token(arch, seq, remat) * seq)


def measure(seq: int, devices: int, attention: str, scan_layers: bool, remat: str,
            max_batch: int) -> dict:
    """Batch 1's figures, and the largest per-device batch (a power of two) fitting each chip.

    The search starts where batches 1 and 2 extrapolate to (memory grows about linearly with
    the batch) and steps by factors of two from there, each step compiled: the answer is
    what XLA reports, not the extrapolation.
    """
    config = run_config(seq, attention, scan_layers, remat)
    mesh, state = student(config, devices)
    row = dict(seq=seq, devices=devices, attention=attention, scan_layers=scan_layers,
               remat=remat, **compile_step(config, mesh, state, 1),
               **formula_flops(config, remat))
    needs = {1: row["need"]}

    def need(batch: int) -> int:
        if batch not in needs:
            needs[batch] = compile_step(config, mesh, state, batch)["need"]
        return needs[batch]

    for chip, limit in CHIPS.items():
        row[f"batch_{chip}"] = largest_fitting(need, limit, max_batch)
    row["compiled_batches"] = sorted(needs)
    return row


def largest_fitting(need, limit: int, max_batch: int) -> int:
    """The largest batch (a power of two up to ``max_batch``; 0 if not even 1) whose
    ``need(batch)`` bytes fit ``limit``: from where batches 1 and 2 extrapolate to, by factors
    of two, each step compiled (``need``)."""
    if need(1) > limit:
        return 0
    per_row = max(need(2) - need(1), 1) if max_batch >= 2 else 1
    batch = 1
    while batch * 2 <= min(max_batch, 1 + (limit - need(1)) // per_row):
        batch *= 2
    while batch > 1 and need(batch) > limit:
        batch //= 2
    while batch * 2 <= max_batch and need(batch * 2) <= limit:
        batch *= 2
    return batch


def compile_seconds(seq: int, devices: int, layers: tuple[int, int]) -> list[dict]:
    """The step's compile seconds at two depths, looped and scanned (blockwise, full remat)."""
    rows = []
    for scan_layers, depth in itertools.product((False, True), layers):
        config = run_config(seq, "blockwise", scan_layers, "full", layers=depth)
        rows.append(dict(scan_layers=scan_layers, layers=depth,
                         compile_s=compile_step(config, *student(config, devices), 1)["compile_s"]))
    return rows


def layer_growth(seq: int, devices: int, depths: list[int]) -> list[dict]:
    """Per-device figures of the scanned step (blockwise attention, batch 1) at each depth,
    for each remat policy, with the activation ``full`` keeps per layer: the layer's input,
    ``seq x hidden`` in the compute dtype."""
    rows = []
    for remat, depth in itertools.product(("none", "full", "save_dots"), depths):
        config = run_config(seq, "blockwise", True, remat, layers=depth)
        figures = compile_step(config, *student(config, devices), 1)
        rows.append(dict(remat=remat, layers=depth, temp=figures["temp"], args=figures["args"],
                         layer_input=seq * STUDENT_1B["hidden_size"] * 2))  # bfloat16
    return rows


def _print_projection(rows: list[dict]) -> None:
    print("\n(c) projected onto each chip's peak, per device at batch 1: model FLOPs "
          "(6N + 12LHQT, PaLM) and hardware FLOPs (model + the remat policy's recomputation), "
          "both by formula (pipeline.hardware); XLA's count, one iteration of each loop, for "
          "reference. ms: hardware FLOPs / peak, a lower bound on the step's time (memory "
          "traffic and communication left out); MFU: model / hardware FLOPs, the most the "
          "step can reach")
    print(f"{'seq':>5} {'dev':>3} {'attention':>9} {'scan':>4} {'remat':>9} {'XLA TF':>7} "
          f"{'model TF':>8} {'hw TF':>7} {'MFU max':>7} "
          + " ".join(f"{'ms ' + label:>8}" for label in PROJECTED))
    for r in rows:
        print(f"{r['seq']:>5} {r['devices']:>3} {r['attention']:>9} "
              f"{'on' if r['scan_layers'] else 'off':>4} {r['remat']:>9} "
              f"{r['flops'] / 1e12:7.2f} {r['model_flops'] / 1e12:8.2f} "
              f"{r['hardware_flops'] / 1e12:7.2f} "
              f"{100 * r['model_flops'] / r['hardware_flops']:6.1f}% "
              + " ".join(f"{1e3 * r['hardware_flops'] / PEAKS[name]:8.1f}"
                         for name in PROJECTED.values()))
    for seq in dict.fromkeys(r["seq"] for r in rows):
        arch = architecture(run_config(seq, *TODAY))
        share = (3 * hardware.attention_flops_per_token(arch, seq)
                 / hardware.train_flops_per_token(arch, seq))
        print(f"seq {seq}: attention is {100 * share:.1f}% of the model FLOPs; a kernel skipping "
              f"causally masked blocks does up to {50 * share:.1f}% of them less")


def _print_layer_growth(rows: list[dict], seq: int, devices: int) -> None:
    depths = sorted({r["layers"] for r in rows})
    shallow, deep = depths[0], depths[-1]
    arch, layer_input = architecture(run_config(seq, *TODAY)), rows[0]["layer_input"]
    # a layer's float32 parameters on one device (fsdp): what its gradient takes
    layer_params = (4 * (hardware.matmul_params(arch) - arch.vocab_size * arch.hidden_size)
                    / arch.num_hidden_layers / devices)
    print(f"\nper-device temp by depth: scanned, blockwise, seq {seq}, {devices} devices, "
          f"batch 1. Per layer, full remat keeps the layer's input ({layer_input / MIB:.0f} MiB); "
          f"the step also holds the layer's float32 gradient and update ({layer_params / MIB:.0f}"
          f" MiB each, its parameters' size)")
    print(f"{'remat':>9} " + " ".join(f"{f'temp@{d} GiB':>12}" for d in depths)
          + f" {'MiB/layer':>9} {'(- input) / params':>18}")
    for remat in dict.fromkeys(r["remat"] for r in rows):
        temp = {r["layers"]: r["temp"] for r in rows if r["remat"] == remat}
        per_layer = (temp[deep] - temp[shallow]) / (deep - shallow)
        print(f"{remat:>9} " + " ".join(f"{temp[d] / GIB:12.2f}" for d in depths)
              + f" {per_layer / MIB:9.1f} {(per_layer - layer_input) / layer_params:18.2f}")


def _variants(grid: bool) -> list[tuple[str, bool, str]]:
    if grid:
        return list(itertools.product(("xla", "blockwise"), (False, True),
                                      ("none", "full", "save_dots")))
    return [TODAY, ("blockwise", True, "full")]


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def main(args: argparse.Namespace) -> None:
    if args.teacher is not None:
        import scale_teacher  # benchmarks/scale_teacher.py, after XLA_FLAGS like this file

        rows = scale_teacher.teacher_rows(args.seq[0], CHIPS, largest_fitting, args.max_batch,
                                          args.teacher or list(scale_teacher.TEACHERS), PEAKS,
                                          tpu=args.tpu)
        if args.json:
            args.json.write_text(json.dumps({"teacher": rows}, indent=2) + "\n")
        return
    print(f"Llama-3.2-1B student step, compile only on {jax.device_count()} virtual CPU devices "
          f"(jax {jax.__version__}); per device, batch 1 unless a column says otherwise")
    header = (f"{'seq':>5} {'dev':>3} {'attention':>9} {'scan':>4} {'remat':>9} "
              f"{'args GiB':>8} {'out GiB':>8} {'temp GiB':>8} {'need GiB':>8} "
              f"{'XLA flops':>9} {'compile s':>9} {'b@32GiB':>7} {'b@16GiB':>7}")
    print(header)
    rows = []
    for seq, devices, (attention, scan_layers, remat) in itertools.product(
            args.seq, args.devices, _variants(args.grid)):
        row = measure(seq, devices, attention, scan_layers, remat, args.max_batch)
        rows.append(row)
        print(f"{seq:>5} {devices:>3} {attention:>9} {'on' if scan_layers else 'off':>4} "
              f"{remat:>9} {_gib(row['args'])} {_gib(row['out'])} {_gib(row['temp'])} "
              f"{_gib(row['need'])} {row['flops']:9.2e} {row['compile_s']:9.1f} "
              f"{row['batch_v4']:>7} {row['batch_v5e']:>7}", flush=True)
    _print_projection(rows)
    growth = []
    if args.layer_growth:
        growth = layer_growth(args.seq[0], args.devices[0], args.layer_growth)
        _print_layer_growth(growth, args.seq[0], args.devices[0])
    timing = []
    if args.compile_layers:
        timing = compile_seconds(args.seq[0], args.devices[0], tuple(args.compile_layers))
        shallow, deep = args.compile_layers
        for scan_layers in (False, True):
            by_depth = {t["layers"]: t["compile_s"] for t in timing
                        if t["scan_layers"] == scan_layers}
            print(f"compile s, {'scanned' if scan_layers else 'looped '} (blockwise, full remat, "
                  f"seq {args.seq[0]}, {args.devices[0]} devices): {shallow} layers "
                  f"{by_depth[shallow]:.1f}, {deep} layers {by_depth[deep]:.1f}, ratio "
                  f"{by_depth[deep] / by_depth[shallow]:.2f}")
    for seq, devices in itertools.product(args.seq, args.devices):
        here = {(r["attention"], r["scan_layers"], r["remat"]): r for r in rows
                if r["seq"] == seq and r["devices"] == devices}
        best = here.get(("blockwise", True, "full"))
        if TODAY in here and best is not None:
            print(f"seq {seq}, {devices} devices: temp per device, today's default "
                  f"(xla, looped, no remat) {here[TODAY]['temp'] / GIB:.1f} GiB vs blockwise + "
                  f"scan + full remat {best['temp'] / GIB:.2f} GiB: "
                  f"{here[TODAY]['temp'] / best['temp']:.0f}x less")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "layer_growth": growth,
                                         "compile": timing}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main(ARGS))
