"""bench_scale.py's teacher section (``--teacher``): the cache fill's step at scale, compiled only.

The step is ``pipeline.teacher.teacher_targets``, what ``fill_cache`` runs per batch: the
teacher's forward pass (``compute_logits=False``) and the fused head + encode of
``pipeline.teacher_head`` (top-k 64 with the tail, q8 values, gap ids: the cache of
``configs/tpu-v4-llama8b-to-1b.yaml``), its chunk ``chunk_positions`` of the per-device rows.
Next to it, today's unfused program: the forward returning ``[batch, seq, vocab]`` float32
logits (the encoder then runs on them, one sequence per call, holding ``[seq, vocab]`` more).

The teachers are Llama-3.1-8B on 4 devices and Llama-3.1-70B on 16 (their config.json shapes,
initialised rather than loaded; Llama 3.1's rope scaling changes no shape and is left out), in
bfloat16 with bfloat16 parameters (a frozen teacher), layers scanned, blockwise attention, laid
out by ``pipeline.models.sharding``'s rules on an fsdp mesh of the replica's devices, the batch
split over it. Per device, from XLA: argument, output, temp bytes and their sum (a teacher
donates nothing), XLA's FLOPs (a loop's body counted once); the largest batch per replica (a
power of two times the devices) whose need fits 16 GiB (v5e) and 32 GiB (v4).

Which compiler: XLA:CPU on virtual devices by default, or with ``--tpu v5e`` (``v4``) the TPU's
own, for a slice that is described rather than attached (libtpu, ``jax.experimental.topologies``,
as MaxText's ``train_compile.py`` compiles ahead of time). XLA:CPU has no bfloat16 matmul: it
converts each bfloat16 dot's operands to float32, and its loop-invariant code motion then
converts the whole stacked ``[layers, ...]`` weights once, outside the layer scan (in its
optimised HLO, ``f32[layers, ...] convert`` of each stacked weight fed to the scan's while
loop), and the gathered head too. A bfloat16 teacher's CPU figures thus hold a float32 copy of
all its weights, twice their bytes (Llama-3.1-70B on 16 devices: temp grows 204 MiB a layer, a
layer's weights being 102 MiB a device), which a TPU, multiplying bfloat16 natively, does not:
compiled for a v5e 4x4 slice, its temp is the same at 2 and at 4 layers.

Throughput at peak: forward FLOPs per token by formula (``pipeline.hardware``: ``2 N + 4 L H Q
T``, N with the head) give tokens/s per chip = peak / FLOPs, a bound (memory traffic,
communication and the encoder's vector work are not in it), and the chip-hours that 100B
tokens take at that rate, next to the on-paper 39k v5e chip-hours for 70B (and the MFU that
figure implies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from pipeline import hardware
from pipeline.cache import TargetSpec
from pipeline.config import ModelSpec
from pipeline.models.build import build_model
from pipeline.models.registry import config_from_hf
from pipeline.models.sharding import BATCH_SPEC, make_mesh, state_shardings
from pipeline.step import TrainState
from pipeline.teacher import teacher_targets
from pipeline.teacher_head import chunk_positions

GIB = 2**30
_LLAMA31 = dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16",
                attention="blockwise", scan_layers=True)
# name: (ModelSpec fields, devices per replica): Llama-3.1-8B and -70B's config.json shapes
TEACHERS = {
    "Llama-3.1-8B": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, **_LLAMA31), 4),
    "Llama-3.1-70B": (dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                           num_attention_heads=64, **_LLAMA31), 16),
}
# The cache of configs/tpu-v4-llama8b-to-1b.yaml: top-k 64, q8 values, gap ids.
SPEC = dict(mode="topk", k=64, value_dtype="q8", id_encoding="gap", temperature=1.0)
PAPER_70B_V5E_CHIP_HOURS = 39e3  # issue 14: the on-paper teacher cost of 100B tokens
TOKENS = 100e9
# TPU slices compiled for without being attached (--tpu): chips -> libtpu's topology name.
TPU_TOPOLOGIES = {"v5e": {4: "2x2", 16: "4x4"}, "v4": {4: "2x2x1", 16: "2x2x4"}}


def abstract_teacher(spec: ModelSpec, mesh) -> TrainState:
    """The teacher's state, abstract (traced, neither compiled nor allocated), laid out on
    ``mesh`` as ``build_model(mesh, frozen)`` lays it out: the parameters by
    ``pipeline.models.sharding``'s rules (``shard_model``), the rest (the step) replicated."""
    shapes = jax.eval_shape(
        lambda: TrainState.create(build_model(spec, spec.vocab_size, 0, mesh, frozen=True)))
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(shape, sharding=replicated):
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)

    return jax.tree.map(place, shapes).replace(params=jax.tree.map(
        place, shapes.params, state_shardings(shapes.params, mesh)))


def _forward_logits(teacher: TrainState, input_ids, attention_mask):
    """Today's unfused teacher program: the whole logits, [batch, seq, vocab] float32."""
    return teacher.model()(input_ids, attention_mask=attention_mask).logits


def compile_fill(state, mesh, vocab: int, batch: int, seq: int, fused: bool) -> dict:
    """Per-device figures of the fill step at ``batch`` rows per replica."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    if fused:
        spec = TargetSpec(vocab_size=vocab, tokenizer_vocab_size=vocab, **SPEC)
        chunk = chunk_positions(max(1, batch // mesh.size), seq)
        lowered = jax.jit(teacher_targets, static_argnames=("spec", "chunk")).lower(
            state, ids, ids, rows, spec, chunk)
    else:
        lowered = jax.jit(_forward_logits).lower(state, ids, ids)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(args=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
                temp=memory.temp_size_in_bytes,
                need=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
                flops=float(cost.get("flops", float("nan"))))


def replica_devices(count: int, tpu: str | None = None) -> list:
    """``count`` devices to compile for: the process's (virtual CPU devices), or with ``tpu``
    (a key of ``TPU_TOPOLOGIES``) a TPU slice of ``count`` chips that is described, not
    attached: libtpu's compiler builds for it on any host (``jax.experimental.topologies``)."""
    if tpu is None:
        return jax.devices()[:count]
    from jax.experimental import topologies

    shape = TPU_TOPOLOGIES[tpu][count]
    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{tpu}:{shape}")
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"--tpu {tpu}: libtpu could not describe a {shape} slice (it needs "
                         f"libtpu: pip install 'jax[tpu]=={jax.__version__}'; a second process "
                         f"using it at once needs ALLOW_MULTIPLE_LIBTPU_LOAD=1): {error}"
                         ) from error
    return topology.devices


def teacher_rows(seq: int, limits: dict[str, int], largest_fitting, max_batch: int,
                 names: list[str], peaks: dict[str, float], tpu: str | None = None) -> list:
    """One row per teacher of ``names``, each printed when done: the fused step at one row
    per device, today's forward at the same batch, and the largest batch per replica fitting
    each of ``limits`` (bytes per device), found by ``largest_fitting(need, limit,
    max_batch)`` over rows per device. Compiled for virtual CPU devices, or with ``tpu`` by
    the TPU compiler for that chip (``replica_devices``)."""
    unknown = sorted(set(names) - set(TEACHERS))
    if unknown:
        raise SystemExit(f"--teacher: expected names among {list(TEACHERS)}, got {unknown}")
    print_header(tpu)
    rows = []
    for name in names:
        fields, devices = TEACHERS[name]
        spec = ModelSpec(**fields)
        mesh = make_mesh(fsdp=devices, devices=replica_devices(devices, tpu))
        state = abstract_teacher(spec, mesh)
        needs = {}

        def need(per_device: int) -> int:
            if per_device not in needs:
                needs[per_device] = compile_fill(state, mesh, spec.vocab_size,
                                                 per_device * devices, seq, True)["need"]
            return needs[per_device]

        fused = compile_fill(state, mesh, spec.vocab_size, devices, seq, True)
        needs[1] = fused["need"]
        unfused = compile_fill(state, mesh, spec.vocab_size, devices, seq, False)
        arch = config_from_hf(spec.hf_config(spec.vocab_size))
        row = dict(teacher=name, devices=devices, seq=seq, fused=fused, unfused=unfused,
                   flops_per_token=hardware.forward_flops_per_token(arch, seq))
        for chip, limit in limits.items():
            row[f"batch_{chip}"] = devices * largest_fitting(need, limit, max_batch)
        rows.append(row)
        print_row(row, peaks)
    return rows


def print_header(tpu: str | None) -> None:
    compiler = f"TPU {tpu}'s compiler (libtpu)" if tpu else "XLA:CPU on virtual devices"
    print(f"teacher fill step (forward + fused head/encode, top-k 64 q8), compiled only by "
          f"{compiler}, per "
          "device at one row per device; today: the forward's [batch, seq, vocab] f32 logits. "
          "b@: the largest batch per replica whose need per device fits (0: not one row per "
          "device)")
    print(f"{'teacher':>14} {'dev':>3} {'seq':>5} {'args GiB':>8} {'out GiB':>8} "
          f"{'temp GiB':>8} {'need GiB':>8} {'XLA flops':>9} {'today temp':>10} "
          f"{'today out':>9} {'today need':>10} {'b@16GiB':>7} {'b@32GiB':>7}", flush=True)


def print_row(r: dict, peaks: dict[str, float]) -> None:
    f, u = r["fused"], r["unfused"]
    print(f"{r['teacher']:>14} {r['devices']:>3} {r['seq']:>5} {f['args'] / GIB:8.2f} "
          f"{f['out'] / GIB:8.2f} {f['temp'] / GIB:8.2f} {f['need'] / GIB:8.2f} "
          f"{f['flops']:9.2e} {u['temp'] / GIB:10.2f} {u['out'] / GIB:9.2f} "
          f"{u['need'] / GIB:10.2f} {r['batch_v5e']:>7} {r['batch_v4']:>7}")
    v5e = peaks["TPU v5e"]
    per_chip = v5e / r["flops_per_token"]
    hours = TOKENS / per_chip / 3600
    line = (f"{r['teacher']}: {r['flops_per_token'] / 1e9:.1f} GFLOP/token forward; at v5e "
            f"peak ({v5e / 1e12:.0f} TFLOP/s) {per_chip:,.0f} tokens/s per chip, "
            f"{hours / 1e3:.1f}k v5e chip-hours for 100B tokens")
    if r["teacher"] == "Llama-3.1-70B":
        line += (f" (on paper: {PAPER_70B_V5E_CHIP_HOURS / 1e3:.0f}k, i.e. "
                 f"{100 * hours / PAPER_70B_V5E_CHIP_HOURS:.0f}% MFU)")
    print(line)
    print(f"{r['teacher']}, {r['devices']} devices, {r['devices']} rows: temp + out per device "
          f"today {(u['temp'] + u['out']) / GIB:.2f} GiB vs fused "
          f"{(f['temp'] + f['out']) / GIB:.2f} GiB: "
          f"{(u['temp'] + u['out']) / (f['temp'] + f['out']):.1f}x less", flush=True)
