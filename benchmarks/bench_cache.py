"""Teacher-output cache: bytes/token on disk, write/read throughput, fidelity, and overheads.

Synthetic teacher logits (state of the generator; calibrated to typical LM statistics, not to
the byte targets): for each token,
  background  z_v = -s * log(1 + v) + N(0, 1)      (Zipf-over-ids prior: in BPE vocabularies
                                                  frequent tokens have low ids)
  candidates  64 ids drawn without replacement from the Zipf(s) prior over ids (Gumbel top-k),
              z = boost - d * log(1 + rank) + N(0, 0.5^2), d ~ U(1.2, 3.0) per token
with s = 1 and boost = 5, giving a mean entropy ~2.2 nats, top-1 probability ~0.55 and top-64
mass ~0.95 at V = 128256 (printed below).

Parts (all in one run):
  1. bytes/token on disk (all shard files, written by CacheWriter) and write/read tokens/s for
     each mode at each vocab size, and the frontier bytes/token vs fidelity for topk k in
     {8,16,32,64} and sampled n in {8,12,24}. Fidelity at T = 1 against the dense teacher:
     KL(teacher || reconstruction) (topk: the k stored probabilities plus the tail mass spread
     evenly over the other real ids; sampled draws are not a distribution, so none), relative
     error of the KD loss value and cosine of its gradient w.r.t. the student logits
     (student = 0.7 * teacher + N(0, 1)), using pipeline.losses.targets_distillation_loss.
  2. teacher loop (a small pipeline.models Llama producing [B, L, V] logits) without and with
     the cache writer (topk k=64 q8, gap ids), wall time ratio; and the loop with the encoder
     run blocking but nothing stored, which separates the encoder's compute (on the device
     that runs the teacher) from the storage work the writer thread hides.
  3. student step (pipeline.step.jit_distillation_step, a smaller Llama) fed the topk targets
     from CacheReader.prefetch vs from targets already in device memory, wall time ratio.
On this CPU-only machine the teacher, the encoder, zstd and the reader share the same cores;
on an accelerator host the teacher and step run on the device and storage on the host CPUs.

``--real`` replaces parts 1-3 with the frontier on real teacher outputs (the demo's teacher
with a 32,768-id tokenizer, trained on the demo text it caches and taken at ``--temperature``;
benchmarks/cache_real.py): bytes/token, KL(teacher || reconstruction) mean and p99, mass
captured and a student's held-out CE for fixed top-k 8/16/32/64/128 (q8sqrt values, and top-64
with format 3's q8 values for reference), top-p 0.9/0.95/0.99, stored-byte budgets
40/60/70/80/100/140 B and one at 0.7x top-64's measured bytes, and sampled n=12; the id and
value codes compared on the top-64 cache; the issue's goals as measured. ``--quick``: a smoke
run (top-k 16 and 64, the q8 reference and the 0.7x budget; no students).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pipeline import losses
from pipeline.cache import CacheManifest, CacheReader, CacheWriter, RunDeclaration, TargetSpec
from pipeline.cache import compress
from pipeline.cache.format import FORMAT_VERSION
from pipeline.models.llama import Llama, LlamaConfig
from pipeline.step import TrainState, jit_distillation_step

ZIPF_S, CANDIDATES, BOOST, DECAY, CAND_NOISE = 1.0, 64, 5.0, (1.2, 3.0), 0.5


def realistic_teacher_logits(rng: np.random.Generator, tokens: int, vocab: int) -> np.ndarray:
    """[tokens, vocab] float32 logits from the generator in the module docstring."""
    log_prior = -ZIPF_S * np.log1p(np.arange(vocab, dtype=np.float32))
    out = log_prior + rng.standard_normal((tokens, vocab), dtype=np.float32)
    # Gumbel top-k = sampling without replacement proportionally to the prior
    gumbel = -np.log(-np.log(rng.random((tokens, vocab), dtype=np.float32) + 1e-20) + 1e-20)
    cands = np.argpartition(-(log_prior + gumbel), CANDIDATES, axis=-1)[:, :CANDIDATES]
    rng.shuffle(cands, axis=1)  # rank within the candidates: random, not by id
    decay = rng.uniform(*DECAY, size=(tokens, 1))
    ranks = np.log1p(np.arange(CANDIDATES))[None]
    values = BOOST - decay * ranks + CAND_NOISE * rng.standard_normal((tokens, CANDIDATES))
    np.put_along_axis(out, cands, values.astype(np.float32), axis=-1)
    return out


def teacher_statistics(logits: np.ndarray) -> dict:
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    p = np.exp(lp)
    top = -np.sort(-p, -1)
    return {"entropy_nats": float(-(p * lp).sum(-1).mean()), "top1": float(top[:, 0].mean()),
            "top64_mass": float(top[:, :64].sum(-1).mean())}


def cache_bytes(root: str) -> int:
    """All shard files (commit records and metadata excluded)."""
    total = 0
    for directory, _, files in os.walk(root):
        if os.path.basename(directory) == "commits":
            continue
        total += sum(os.path.getsize(os.path.join(directory, f)) for f in files
                     if f not in ("zarr.json", "manifest.json"))
    return total


def write_cache(root, spec, logits, seq_len, batch):
    """Writes [N, L, V] logits; returns (manifest, seconds). The encoder is compiled first."""
    n = logits.shape[0]
    manifest = CacheManifest(spec, "bench-teacher", "bench-tok", "bench-data", seq_len, n,
                             shard_sequences=batch, chunk_sequences=1)
    batches = [(jnp.asarray(logits[f:f + batch]), np.arange(f, min(f + batch, n)))
               for f in range(0, n, batch)]  # on the device already, as teacher outputs are
    jax.block_until_ready(compress.encode(*batches[0], spec))
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    with CacheWriter(root, manifest) as writer:
        for device_logits, idx in batches:
            writer.write(device_logits, idx)
    return manifest, time.perf_counter() - start


def read_all(root, manifest, batch):
    run = RunDeclaration("bench-tok", "bench-data", manifest.target.vocab_size, manifest.seq_len,
                         manifest.target.temperature or 1.0)
    reader = CacheReader(root, run)
    jax.block_until_ready(reader.read(np.arange(min(batch, manifest.num_sequences))))
    reader = CacheReader(root, run)  # fresh: checksum verification is part of the timing
    start = time.perf_counter()
    parts = [reader.read(np.arange(f, min(f + batch, manifest.num_sequences)))
             for f in range(0, manifest.num_sequences, batch)]
    jax.block_until_ready(parts)
    seconds = time.perf_counter() - start
    return {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}, seconds


def targets_of(spec, decoded):
    if spec.mode == "full":
        return losses.DenseTargets(decoded["teacher_logits"])
    if spec.mode == "topk":
        return losses.TopKTargets(decoded["teacher_topk_ids"], decoded["teacher_topk_logprobs"],
                                  decoded["teacher_tail_logmass"])
    return losses.SampledTargets(decoded["teacher_sample_ids"],
                                 decoded["teacher_sample_counts"], decoded["teacher_entropy"])


def fidelity(spec, decoded, teacher, student):
    """KL(teacher || reconstruction), loss value relative error, gradient cosine."""
    teacher, student = jnp.asarray(teacher), jnp.asarray(student)
    dense = lambda s: losses.distillation_loss(s, teacher, temperature=1.0, alpha=1.0)[0]
    sparse = lambda s: losses.targets_distillation_loss(s, targets_of(spec, decoded),
                                                        temperature=1.0, alpha=1.0)[0]
    dv, dg = jax.value_and_grad(dense)(student)
    sv, sg = jax.value_and_grad(sparse)(student)
    cos = float(jnp.vdot(dg, sg) / (jnp.linalg.norm(dg) * jnp.linalg.norm(sg)))
    kl = float("nan")
    if spec.mode == "topk":
        lp = jax.nn.log_softmax(teacher, -1)
        vocab, k = teacher.shape[-1], spec.k
        spread = decoded["teacher_tail_logmass"][..., None] - np.log(vocab - k)
        recon = jnp.broadcast_to(spread, lp.shape)
        recon = jnp.put_along_axis(recon, decoded["teacher_topk_ids"],
                                   decoded["teacher_topk_logprobs"], axis=-1, inplace=False)
        kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - recon), -1)))
    elif spec.mode == "full":
        lp = jax.nn.log_softmax(teacher, -1)
        recon = jax.nn.log_softmax(decoded["teacher_logits"].astype(jnp.float32), -1)
        kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - recon), -1)))
    return {"kl_teacher_recon": kl, "loss_rel_err": float(abs(sv - dv) / abs(dv)),
            "grad_cosine": cos}


def llama(vocab, hidden, layers, seed):
    config = LlamaConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         head_dim=64)
    return Llama(config, rngs=nnx.Rngs(seed))


def teacher_loop(args, root):
    """(seconds without writing, seconds with writing, manifest, input ids)."""
    vocab, L, B = args.loop_vocab, args.seq_len, args.batch
    state = TrainState.create(llama(vocab, args.teacher_hidden, args.teacher_layers, 0))
    forward = jax.jit(lambda st, ids: st.model()(ids).logits)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, size=(args.loop_batches * B, L), dtype=np.int32)
    spec = TargetSpec("topk", vocab, vocab, k=64)
    manifest = CacheManifest(spec, "bench-teacher", "bench-tok", "bench-data", L, len(ids),
                             shard_sequences=B)
    jax.block_until_ready(forward(state, ids[:B]))
    jax.block_until_ready(compress.encode(forward(state, ids[:B]), np.arange(B), spec))

    def run(how: str) -> float:
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        writer = CacheWriter(root, manifest) if how == "write" else None
        for first in range(0, len(ids), B):
            logits = forward(state, ids[first:first + B])
            if how == "plain":
                logits.block_until_ready()  # a teacher loop consumes its output
            elif how == "encode":
                jax.block_until_ready(compress.encode(logits, np.arange(first, first + B), spec))
            else:
                writer.write(logits, np.arange(first, first + B))
        if writer is not None:
            writer.close()
        return time.perf_counter() - start

    return {how: min(run(how) for _ in range(2)) for how in ("plain", "encode", "write")}, \
        manifest, ids


def student_loop(args, root, manifest, ids):
    """(seconds from in-memory targets, seconds from the reader's prefetch)."""
    vocab, B = args.loop_vocab, args.batch
    state = TrainState.create(llama(vocab, args.student_hidden, args.student_layers, 2),
                              optax.adamw(1e-3))
    run = RunDeclaration("bench-tok", "bench-data", vocab, args.seq_len, 1.0)
    reader = CacheReader(root, run)
    batches = [np.arange(f, f + B) for f in range(0, len(ids), B)]
    in_memory = [reader.read(b) for b in batches]
    options = dict(temperature=1.0, alpha=1.0)

    def batch_of(i, targets):
        return {"input_ids": jnp.asarray(ids[batches[i]]),
                "attention_mask": jnp.ones((B, args.seq_len), jnp.int32), **targets}

    state, metrics = jit_distillation_step(state, batch_of(0, in_memory[0]), None, **options)
    jax.block_until_ready(metrics.loss)

    def timed(source):
        nonlocal state
        start = time.perf_counter()
        for i, targets in enumerate(source):
            state, metrics = jit_distillation_step(state, batch_of(i, targets), None, **options)
        jax.block_until_ready(metrics.loss)
        return time.perf_counter() - start

    memory = min(timed(in_memory) for _ in range(2))
    prefetched = min(timed(CacheReader(root, run).prefetch(batches)) for _ in range(2))
    return memory, prefetched


def add_teacher_arguments(group) -> None:
    """The options of --real's teacher and cached text (benchmarks/cache_real.py), which
    bench_budget.py --real shares."""
    group.add_argument("--real-workdir", default="runs/bench_cache_real",
                       help="tokenizer, data, teacher, caches and students (reused by re-runs)")
    group.add_argument("--real-vocab", type=int, default=32768, help="tokenizer ids")
    group.add_argument("--teacher-steps", type=int, default=300,
                       help="the teacher's steps on the cached text (all of it)")
    group.add_argument("--teacher-lr", type=float, default=1e-2,
                       help="the teacher's peak learning rate (demo.teacher_learning_rate)")
    group.add_argument("--temperature", type=float, default=0.5,
                       help="loss.temperature, so the caches' T: 0.5 sharpens this small "
                            "teacher to a real 135M teacher's top-1 mass (about 0.6)")
    group.add_argument("--real-kb", type=float, default=48,
                       help="the cached data: the demo's smallest files up to this many kB")
    group.add_argument("--real-set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="an override of configs/demo.yaml (repeatable)")


def add_teacher_overrides(args) -> None:
    """--teacher-lr and --temperature as overrides of configs/demo.yaml, before --real-set's."""
    args.real_set[:0] = [f"demo.teacher_learning_rate={args.teacher_lr}",
                         f"loss.temperature={args.temperature}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", default="32000,128256")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per vocab size")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch and shard")
    parser.add_argument("--fidelity-tokens", type=int, default=512)
    parser.add_argument("--loop-vocab", type=int, default=32000)
    parser.add_argument("--loop-batches", type=int, default=6)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--skip-loops", action="store_true", help="only part 1")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes (with --real: a 4,096-id tokenizer, 8 kB "
                             "of text, 2 teacher steps, no students; top-k 16 and 64, the q8 "
                             "reference and the goal's budget; in <workdir>-quick)")
    real = parser.add_argument_group("real teacher outputs (--real; benchmarks/cache_real.py)")
    real.add_argument("--real", action="store_true",
                      help="the frontier on the demo's trained teacher instead of part 1-3")
    add_teacher_arguments(real)
    real.add_argument("--student-steps", type=int, default=30,
                      help="steps of each setting's distilled student (0: no students)")
    real.add_argument("--real-kmax", type=int, default=128,
                      help="cache.k (most ids a token keeps) of the top-p and budget settings")
    real.add_argument("--real-fidelity-seqs", type=int, default=None,
                      help="held-out sequences the reconstruction is measured on (default: "
                           "all of them)")
    real.add_argument("--real-code-seqs", type=int, default=64,
                      help="cached sequences the id codes are compared on")
    args = parser.parse_args()
    if args.real:
        import cache_real

        add_teacher_overrides(args)
        if args.quick:
            args.real_workdir += "-quick"
            args.real_vocab, args.teacher_steps, args.student_steps = 4096, 2, 0
            args.real_kb, args.real_fidelity_seqs, args.real_code_seqs = 8, 2, 4
            args.real_set.append("optimizer.warmup_steps=1")
        results = cache_real.run(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if args.quick:
        args.vocab_sizes, args.sequences, args.skip_loops = "32000", 2, True
    tmp = tempfile.mkdtemp(prefix="bench_cache_")
    results = {"generator": {"zipf_s": ZIPF_S, "candidates": CANDIDATES, "boost": BOOST,
                             "decay": DECAY, "cand_noise": CAND_NOISE}, "formats": []}
    configs = [("topk", dict(k=k)) for k in (8, 16, 32, 64)]
    configs += [("topk", dict(k=64, id_encoding="packed")), ("topk", dict(k=64, value_dtype="bfloat16"))]
    configs += [("topk", dict(k=64, value_dtype="q8"))]  # format 3's values, side by side
    configs += [("topk", dict(k=64, format_version=2))]  # format 2's gap code and q8 values
    configs += [("sampled", dict(n_draws=n)) for n in (8, 12, 24)]
    configs += [("full", dict(value_dtype="bfloat16", temperature=None))]
    header = (f"{'V':>7} {'mode':8} {'config':22} {'B/token':>9} {'write tok/s':>12} "
              f"{'read tok/s':>11} {'KL(t||rec)':>11} {'loss err':>9} {'grad cos':>9}")
    try:
        for vocab in [int(v) for v in args.vocab_sizes.split(",")]:
            rng = np.random.default_rng(0)
            n, L = args.sequences, args.seq_len
            logits = realistic_teacher_logits(rng, n * L, vocab).reshape(n, L, vocab)
            stats = teacher_statistics(logits.reshape(-1, vocab)[:args.fidelity_tokens])
            results.setdefault("teacher", {})[vocab] = stats
            print(f"\nV={vocab}: {n * L} tokens; teacher entropy {stats['entropy_nats']:.2f} nats, "
                  f"top-1 {stats['top1']:.2f}, top-64 mass {stats['top64_mass']:.3f}")
            print(header)
            fid_seqs = max(1, args.fidelity_tokens // L)
            teacher = logits[:fid_seqs]
            student = 0.7 * teacher + np.random.default_rng(5).standard_normal(teacher.shape,
                                                                               dtype=np.float32)
            for mode, fields in configs:
                spec = TargetSpec(mode, vocab, vocab, **fields)
                root = os.path.join(tmp, f"{vocab}-{len(results['formats'])}")
                manifest, write_s = write_cache(root, spec, logits, L, args.batch)
                decoded, read_s = read_all(root, manifest, args.batch)
                per_token = cache_bytes(root) / (n * L)
                fid = fidelity(spec, {k: v[:fid_seqs] for k, v in decoded.items()}, teacher, student)
                shutil.rmtree(root)
                label = {"topk": f"k={spec.k},{spec.value_dtype},{spec.id_encoding}"
                                 + ("" if spec.format_version == FORMAT_VERSION else
                                    f",v{spec.format_version}"),
                         "sampled": f"n={spec.n_draws},{spec.id_encoding}",
                         "full": spec.value_dtype}[mode]
                row = {"vocab": vocab, "mode": mode, "config": label, "bytes_per_token": per_token,
                       "write_tokens_per_s": n * L / write_s, "read_tokens_per_s": n * L / read_s,
                       **fid}
                results["formats"].append(row)
                print(f"{vocab:>7} {mode:8} {label:22} {per_token:9.1f} {row['write_tokens_per_s']:12.0f} "
                      f"{row['read_tokens_per_s']:11.0f} {fid['kl_teacher_recon']:11.4f} "
                      f"{fid['loss_rel_err']:9.4f} {fid['grad_cosine']:9.4f}")
        if not args.skip_loops:
            root = os.path.join(tmp, "loop")
            loop, manifest, ids = teacher_loop(args, root)
            memory, prefetched = student_loop(args, root, manifest, ids)
            results["teacher_loop"] = {"without_s": loop["plain"], "encode_only_s": loop["encode"],
                                       "with_writing_s": loop["write"],
                                       "ratio": loop["write"] / loop["plain"],
                                       "storage_ratio": loop["write"] / loop["encode"]}
            results["student_step"] = {"in_memory_s": memory, "reader_s": prefetched,
                                       "ratio": prefetched / memory}
            tokens = len(ids) * args.seq_len
            print(f"\nteacher loop ({tokens} tokens, Llama hidden {args.teacher_hidden} x "
                  f"{args.teacher_layers} layers, V={args.loop_vocab}): without writing "
                  f"{loop['plain']:.2f} s; + encoder only (blocking, no storage) "
                  f"{loop['encode']:.2f} s; with CacheWriter {loop['write']:.2f} s")
            print(f"student step (Llama hidden {args.student_hidden} x {args.student_layers}, "
                  f"topk k=64 targets): in-memory {memory:.2f} s, reader+prefetch {prefetched:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def find(vocab, config):
        return next(r for r in results["formats"] if r["vocab"] == vocab and r["config"] == config)

    print("\nheadline")
    vocabs = sorted({r["vocab"] for r in results["formats"]})
    for vocab in vocabs:
        ours = find(vocab, "k=64,q8sqrt,gap")
        q8 = find(vocab, "k=64,q8,gap")
        packed = find(vocab, "k=64,q8sqrt,packed")
        v2 = find(vocab, "k=64,q8,gap,v2")
        sampled = find(vocab, "n=12,gap")
        print(f"V={vocab}: topk k=64 {ours['bytes_per_token']:.1f} B/token (q8 values: "
              f"{q8['bytes_per_token']:.1f}, ratio "
              f"{ours['bytes_per_token'] / q8['bytes_per_token']:.3f}; format 2's gap "
              f"code and q8 values: {v2['bytes_per_token']:.1f}, ratio "
              f"{ours['bytes_per_token'] / v2['bytes_per_token']:.3f}; ids packed at "
              f"ceil(log2 V) bits: {packed['bytes_per_token']:.1f}; ratio "
              f"{ours['bytes_per_token'] / packed['bytes_per_token']:.2f}); sampled n=12 "
              f"{sampled['bytes_per_token']:.1f} B/token")
    if "teacher_loop" in results:
        print(f"teacher loop with CacheWriter / without: {results['teacher_loop']['ratio']:.3f} "
              f"(storage alone, vs the loop + blocking encoder: "
              f"{results['teacher_loop']['storage_ratio']:.3f})")
        print(f"student step from reader / from memory: {results['student_step']['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
