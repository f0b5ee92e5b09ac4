"""Real teacher outputs for ``bench_cache.py --real``: the demo's teacher, cached on the demo corpus.

Everything is built through the pipeline's own API (the steps of actors/demo.py) in a work
directory that later runs reuse (each step is skipped when its output exists):

1. a byte-level BPE tokenizer of ``--real-vocab`` ids (32,768 by default, so that ids cost what
   they cost at real vocabularies) trained on the standard library's sources, tests left out
   (:func:`tokenizer_sources`; the demo's 80 modules alone yield only about 18,000 merges);
2. the demo corpus prepared with it, and the demo's teacher pretrained on it
   (``actors.demo.demo_configs``, ``pipeline.train.train``);
3. a smaller dataset of the demo's smallest files (``--real-kb`` of text, same tokenizer), the one the caches
   and the students use: one pass of the teacher over each of its batches feeds one
   ``pipeline.cache.CacheWriter`` per setting (``pipeline.cache.compress`` encodes on the device),
   so every setting stores the same teacher outputs;
4. per setting, the demo's student distilled from that cache for a fixed number of steps
   (``pipeline.train.train``, offline teacher source) and its held-out CE.

Fidelity is measured against the teacher's dense logits on a sample of tokens:
KL(teacher || reconstruction) per token, where the reconstruction of a top-k target keeps the
stored probabilities of its ids and spreads the stored tail mass evenly over the other real ids
(the distribution the k+1-bucket loss stands for), and the mass captured (the teacher's true
probability of the stored ids).
"""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from pathlib import Path

import numpy as np

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def demo_config(workdir: Path, vocab: int, teacher_steps: int, overrides=()):
    """configs/demo.yaml with its paths under ``workdir``, a ``vocab``-id tokenizer and
    ``overrides`` (``KEY.PATH=VALUE``)."""
    from pipeline.config import load_config

    return load_config(DEMO_CONFIG, [f"run_dir={workdir}",
                                     f"data.tokenizer={workdir / 'tokenizer.json'}",
                                     f"data.prepared_dir={workdir / 'data'}",
                                     f"cache.path={workdir / 'demo-cache'}",
                                     f"demo.tokenizer_vocab_size={vocab}",
                                     f"demo.teacher_steps={teacher_steps}",
                                     "logging.progress=false", *overrides])


def tokenizer_sources() -> list[str]:
    """The interpreter's standard-library .py files, recursively, without site-packages and the
    test suites (some of which are deliberately not UTF-8)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted(str(p) for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def prepare_teacher(workdir: Path, vocab: int, teacher_steps: int, overrides=()):
    """Tokenizer, demo data and the demo's trained teacher in ``workdir`` (made or reused).
    Returns (the demo config, the demo's file selection, the teacher's directory)."""
    from actors.demo import demo_configs, stdlib_sources
    from pipeline.data import prepare_dataset, train_bpe_tokenizer
    from pipeline.train import train

    config = demo_config(workdir, vocab, teacher_steps, overrides)
    sources = stdlib_sources(config.demo.max_files)
    runs = demo_configs(config, sources)
    if not Path(config.data.tokenizer).exists():
        train_bpe_tokenizer(tokenizer_sources(), vocab, config.data.tokenizer)
    if not (Path(config.data.prepared_dir) / "metadata.json").exists():
        prepare_dataset(runs["teacher"].data, progress=False)
    teacher_dir = Path(runs["distilled"].model.teacher.path)
    if not (teacher_dir / "config.json").exists():
        result = train(runs["teacher"])
        (workdir / "teacher.json").write_text(json.dumps(result.final_eval, indent=1))
    return config, sources, teacher_dir


def settings(kmax: int) -> list[tuple[str, dict]]:
    """The cache settings of the frontier: (label, cache config fields)."""
    rows = [(f"top-k {k}", {"mode": "topk", "k": k}) for k in (8, 16, 32, 64)]
    rows += [(f"top-p {p}", {"mode": "topk", "k": kmax, "top_p": p}) for p in (0.9, 0.95, 0.99)]
    rows += [(f"budget {b} B", {"mode": "topk", "k": kmax, "bytes_per_token": float(b)})
             for b in (40, 60, 100)]
    return rows + [("sampled n=12", {"mode": "sampled", "n_draws": 12})]


def bench_sources(sources: list[str], kilobytes: float) -> list[str]:
    """The demo's smallest files, smallest first, until they hold ``kilobytes`` of source: the
    text the caches hold (encoding a token costs ~1 s of CPU per setting here)."""
    chosen, total = [], 0
    for path in sorted(sources, key=lambda f: (Path(f).stat().st_size, f)):
        if total >= kilobytes * 1000:
            break
        chosen.append(path)
        total += Path(path).stat().st_size
    return chosen


def bench_config(config, sources: list[str], workdir: Path, kilobytes: float, steps: int):
    """The distilled student's run of the demo on :func:`bench_sources` (a fifth of the files
    held out), ``steps`` steps (warm-up at most a quarter of them), evaluated once at the end."""
    from actors.demo import demo_configs

    distilled = demo_configs(config, sources)["distilled"]
    data = dataclasses.replace(distilled.data, sources=tuple(bench_sources(sources, kilobytes)),
                               eval_fraction=0.2,
                               prepared_dir=str(workdir / f"text-{kilobytes:g}kB" / "data"))
    return dataclasses.replace(
        distilled, data=data,
        train=dataclasses.replace(distilled.train, steps=steps),
        optimizer=dataclasses.replace(distilled.optimizer, warmup_steps=min(
            distilled.optimizer.warmup_steps, steps // 4)),
        eval=dataclasses.replace(distilled.eval, every_steps=steps),
        checkpoint=dataclasses.replace(distilled.checkpoint, every_steps=steps))


def setting_config(base, label: str, fields: dict):
    """``base`` caching and distilling with the cache of one setting, beside its data
    (CacheConfig refuses bad fields with a ConfigError; a field this kdpipe lacks is a
    TypeError)."""
    slug = label.replace(" ", "-").replace("=", "")
    root = Path(base.data.prepared_dir).parent
    cache = dataclasses.replace(base.cache, path=str(root / "caches" / slug), **fields)
    return dataclasses.replace(base, cache=cache, run_dir=str(
        root / f"students-{base.train.steps}" / slug))


def teacher_forward():
    import jax

    return jax.jit(lambda state, batch: state.model()(
        batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def fill_caches(configs: dict, teacher, teacher_fp: str, split: str, batch: int) -> float:
    """Cache ``split`` for every config of ``configs`` from one teacher pass per batch (each
    logits batch goes to every setting's CacheWriter). Complete caches are kept; a partial one
    is filled again from scratch. Returns the seconds spent."""
    import shutil
    import time

    from pipeline.cache import CacheWriter, split_location
    from pipeline.data import TokenDataset, read_info
    from pipeline.step import TrainState
    from pipeline.teacher import cache_manifest

    any_config = next(iter(configs.values()))
    info = read_info(any_config.data.prepared_dir)
    if not info.splits[split]["num_rows"]:
        return 0.0
    vocab = teacher.config.vocab_size
    writers = []
    for config in configs.values():
        manifest = cache_manifest(config, info, split, vocab_size=vocab, teacher_fp=teacher_fp)
        location = split_location(config.cache.path, split)
        writer = CacheWriter(location, manifest)
        if not writer.pending_shards(range(manifest.num_shards)):
            writer.close()
            continue
        if writer.committed_shards:
            writer.close()
            shutil.rmtree(location)
            writer = CacheWriter(location, manifest)
        writers.append(writer)
    if not writers:
        return 0.0
    start = time.perf_counter()
    dataset = TokenDataset(any_config.data.prepared_dir, split, vocab_size=vocab)
    forward, state = teacher_forward(), TrainState.create(teacher)
    rows = info.splits[split]["num_rows"]
    for first in range(0, rows, batch):
        indices = np.arange(first, min(first + batch, rows))
        logits = forward(state, dataset.read_rows(indices))
        for writer in writers:
            writer.write(logits, indices)
    for writer in writers:
        writer.close()
    return time.perf_counter() - start


def reconstruction_stats(logits: np.ndarray, targets: dict, real_vocab: int) -> dict:
    """Per-token fidelity of top-k targets against the teacher's logits ``[T, V]``.

    targets: ``teacher_topk_ids`` [T, m], ``teacher_topk_logprobs`` [T, m] (unused slots -inf)
    and ``teacher_tail_logmass`` [T] (pipeline/losses/targets.py). The reconstruction r keeps
    the stored probabilities of the stored ids and gives each of the other real ids
    tail / (real_vocab - k_t). Returns float64 arrays: ``kl`` = KL(teacher || r) (teacher at
    T = 1 over the real ids), ``mass`` = the teacher's probability of the stored ids, ``k``.
    Sparse: sum_v p log p - sum_stored p log q - (1 - mass) log(tail / (V - k))."""
    x = np.asarray(logits, np.float64)[:, :real_vocab]
    lp = x - x.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    p = np.exp(lp)
    used = np.isfinite(np.asarray(targets["teacher_topk_logprobs"], np.float64))
    ids = np.where(used, np.asarray(targets["teacher_topk_ids"]), 0)
    lq = np.where(used, np.asarray(targets["teacher_topk_logprobs"], np.float64), 0.0)
    p_stored = np.where(used, np.take_along_axis(p, ids, -1), 0.0)
    mass = p_stored.sum(-1)
    k = used.sum(-1)
    rest = np.clip(1.0 - mass, 0.0, None)
    spread = np.asarray(targets["teacher_tail_logmass"], np.float64) - np.log(
        np.maximum(real_vocab - k, 1))
    with np.errstate(invalid="ignore"):
        # no id outside the stored ones: no tail term (1 - mass is rounding there)
        tail_term = np.where((rest > 0) & (k < real_vocab), rest * spread, 0.0)
    kl = (p * lp).sum(-1) - (p_stored * lq).sum(-1) - tail_term
    return {"kl": kl, "mass": mass, "k": k.astype(np.float64)}


def sampled_mass(logits: np.ndarray, targets: dict, real_vocab: int) -> np.ndarray:
    """The teacher's probability of each token's distinct sampled ids (counts > 0)."""
    x = np.asarray(logits, np.float64)[:, :real_vocab]
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    drawn = np.asarray(targets["teacher_sample_counts"]) > 0
    ids = np.where(drawn, np.asarray(targets["teacher_sample_ids"]), 0)
    return np.where(drawn, np.take_along_axis(p, ids, -1), 0.0).sum(-1)


def teacher_stats(logits: np.ndarray, real_vocab: int) -> dict:
    """Entropy, top-1 and top-64 mass, ids needed for 90% of the mass (median, mean)."""
    x = np.asarray(logits, np.float64)[:, :real_vocab]
    lp = x - x.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    p = np.exp(lp)
    top = -np.sort(-p, -1)
    need90 = (np.cumsum(top, -1) < 0.9).sum(-1) + 1
    return {"entropy_nats": float(-(p * lp).sum(-1).mean()), "top1": float(top[:, 0].mean()),
            "top64_mass": float(top[:, :64].sum(-1).mean()),
            "ids_for_90pct_median": float(np.median(need90)),
            "ids_for_90pct_mean": float(need90.mean())}


BYTES = {"name": "bytes", "configuration": {"endian": "little"}}


def zstd(level: int) -> dict:
    return {"name": "zstd", "configuration": {"level": level}}


def blosc(shuffle: str, typesize: int) -> dict:
    """TensorStore's zarr3 blosc codec (zstd level 5 inside)."""
    return {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": shuffle,
                                               "typesize": typesize, "blocksize": 0}}


def stored_bytes(a: np.ndarray, codec: dict, slot_major: bool) -> int:
    """Bytes of ``a`` [S, L, m] stored as a zarr3 array in memory, one chunk per sequence (the
    cache's inner chunk), ``codec`` after the ``bytes`` codec; ``slot_major`` puts the
    ``transpose`` codec first, as the cache does for its per-slot arrays."""
    import tensorstore as ts

    codecs = ([{"name": "transpose", "configuration": {"order": [2, 0, 1]}}] if slot_major
              else []) + [BYTES, codec]
    spec = {"driver": "zarr3", "kvstore": "memory://", "metadata": {
        "shape": list(a.shape), "data_type": str(a.dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *a.shape[1:]]}},
        "chunk_key_encoding": {"name": "default"}, "fill_value": 0, "codecs": codecs}}
    store = ts.open(spec, create=True).result()
    store.write(a).result()
    kvstore = store.kvstore
    return sum(len(kvstore.read(key).result().value) for key in kvstore.list().result()
               if not key.endswith(b"zarr.json"))


def id_codes(stored: dict[str, np.ndarray], ids: np.ndarray, spec) -> dict[str, float]:
    """Bytes/token of fixed top-k ids and q8 values under several codes. ``stored``: the
    cache's gap-coded arrays (``CacheReader.read_stored``), ``ids``: the decoded sorted ids
    ``[S, L, k]`` of the same sequences, ``spec`` their TargetSpec."""
    import jax.numpy as jnp

    from pipeline.cache import compress

    tokens = ids.shape[0] * ids.shape[1]
    wide = np.uint16 if spec.vocab_size <= 2**16 else np.uint32
    gaps = np.diff(ids, axis=-1, prepend=-1) - 1
    packed_spec = dataclasses.replace(spec, id_encoding="packed")
    flat = jnp.asarray(ids.reshape(tokens, -1))
    packed = np.asarray(compress.encode_ids(flat, jnp.ones(flat.shape, bool), packed_spec)
                        ["id_stream"]).reshape(*ids.shape[:2], -1)
    lengths, bits = stored["id_gap_lengths"], stored["id_stream"]
    size = wide().itemsize
    codes = {
        "gap lengths + extra bits, zstd 5 slot-major (now)":
            stored_bytes(lengths, zstd(5), True) + stored_bytes(bits, zstd(5), True),
        "gap lengths + extra bits, zstd 19 slot-major":
            stored_bytes(lengths, zstd(19), True) + stored_bytes(bits, zstd(19), True),
        "gap lengths + extra bits, zstd 5 token-major":
            stored_bytes(lengths, zstd(5), False) + stored_bytes(bits, zstd(5), False),
        "gap lengths + extra bits, blosc bitshuffle":
            stored_bytes(lengths, blosc("bitshuffle", 1), True)
            + stored_bytes(bits, blosc("bitshuffle", 1), True),
        f"packed {packed_spec.vocab_size.bit_length() - 1}-bit ids, zstd 5 slot-major":
            stored_bytes(packed, zstd(5), True),
        f"gaps {np.dtype(wide).name}, zstd 5 slot-major":
            stored_bytes(gaps.astype(wide), zstd(5), True),
        f"gaps {np.dtype(wide).name}, zstd 5 token-major":
            stored_bytes(gaps.astype(wide), zstd(5), False),
        f"gaps {np.dtype(wide).name}, zstd 19 slot-major":
            stored_bytes(gaps.astype(wide), zstd(19), True),
        f"gaps {np.dtype(wide).name}, blosc bitshuffle":
            stored_bytes(gaps.astype(wide), blosc("bitshuffle", size), False),
        f"gaps {np.dtype(wide).name}, blosc bitshuffle slot-major":
            stored_bytes(gaps.astype(wide), blosc("bitshuffle", size), True),
        f"gaps {np.dtype(wide).name}, blosc byteshuffle":
            stored_bytes(gaps.astype(wide), blosc("shuffle", size), False),
        f"gaps {np.dtype(wide).name}, blosc no shuffle":
            stored_bytes(gaps.astype(wide), blosc("noshuffle", size), False),
        f"ids {np.dtype(wide).name}, blosc bitshuffle":
            stored_bytes(ids.astype(wide), blosc("bitshuffle", size), False),
    }
    values = {"q8 values, zstd 5 slot-major (now)": stored_bytes(stored["values"], zstd(5), True),
              "q8 values, zstd 19 slot-major": stored_bytes(stored["values"], zstd(19), True),
              "q8 values, zstd 5 token-major": stored_bytes(stored["values"], zstd(5), False),
              "q8 values, blosc bitshuffle": stored_bytes(stored["values"],
                                                           blosc("bitshuffle", 1), False),
              "q8 values, blosc bitshuffle slot-major":
                  stored_bytes(stored["values"], blosc("bitshuffle", 1), True)}
    return {name: n / tokens for name, n in {**codes, **values}.items()}


def _reader(location: str):
    from pipeline.cache import CacheReader, RunDeclaration, read_manifest

    m = read_manifest(location)
    return CacheReader(location, RunDeclaration(m.tokenizer_fingerprint, m.dataset_fingerprint,
                                                m.target.vocab_size, m.seq_len,
                                                m.target.temperature or 1.0))


def student_ce(config) -> dict:
    """Held-out metrics of the student distilled with ``config`` (trained once; the figures
    are kept in its run directory for later runs)."""
    from pipeline.train import train

    done = Path(config.run_dir) / "bench.json"
    if not done.exists():
        result = train(config)
        done.write_text(json.dumps({**result.final_eval, "tokens_per_s": result.tokens_per_s}))
    return json.loads(done.read_text())


def run(args) -> dict:
    """Everything of the real-outputs mode; prints the tables and returns the figures."""
    import jax

    from pipeline.cache import read_manifest, split_location
    from pipeline.cache import compress
    from pipeline.data import TokenDataset, prepare_dataset, read_info
    from pipeline.errors import KdpipeError
    from pipeline.models.build import build_model
    from pipeline.models.hf_io import teacher_fingerprint
    from pipeline.step import TrainState

    workdir = Path(args.real_workdir)
    config, sources, teacher_dir = prepare_teacher(workdir, args.real_vocab, args.teacher_steps,
                                                   args.real_set)
    base = bench_config(config, sources, workdir, args.real_kb, args.student_steps)
    if not (Path(base.data.prepared_dir) / "metadata.json").exists():
        prepare_dataset(base.data, progress=False)
    info = read_info(base.data.prepared_dir)
    if not info.splits["eval"]["num_rows"]:
        raise SystemExit(f"--real-kb {args.real_kb}: no file of that text is held out; take more")
    configs, missing = {}, {}
    for label, fields in settings(args.real_kmax):
        try:
            configs[label] = setting_config(base, label, fields)
        except (TypeError, KdpipeError) as e:  # a field this kdpipe lacks, or refuses
            missing[label] = str(e)
    teacher = build_model(base.model.teacher, frozen=True)
    teacher_fp = teacher_fingerprint(teacher_dir)
    fill_s = {split: fill_caches(configs, teacher, teacher_fp, split, base.train.global_batch_size)
              for split in ("train", "eval")}
    print(f"\nreal teacher outputs: tokenizer {info.vocab_size} ids; teacher {teacher_dir} "
          f"(demo config, {args.teacher_steps} steps); cached data: the smallest demo files "
          f"up to {args.real_kb:g} kB, train {info.splits['train']['num_rows']} x {info.seq_len} tokens, eval "
          f"{info.splits['eval']['num_rows']} x {info.seq_len}; caches filled in "
          f"{fill_s['train'] + fill_s['eval']:.0f} s (0 = reused)")

    # the teacher's dense logits on held-out tokens, against which every setting is measured
    rows = np.arange(min(args.real_fidelity_seqs, info.splits["eval"]["num_rows"]))
    batch = TokenDataset(base.data.prepared_dir, "eval", vocab_size=teacher.config.vocab_size
                         ).read_rows(rows)
    logits = np.asarray(teacher_forward()(TrainState.create(teacher), batch), np.float32)
    real = batch["attention_mask"].reshape(-1) > 0
    logits = logits.reshape(-1, logits.shape[-1])[real]
    stats = teacher_stats(logits, info.vocab_size)
    print(f"teacher on {len(logits)} held-out tokens: entropy {stats['entropy_nats']:.2f} nats, "
          f"top-1 {stats['top1']:.2f}, top-64 mass {stats['top64_mass']:.3f}, ids for 90% of the "
          f"mass: median {stats['ids_for_90pct_median']:.0f}, mean "
          f"{stats['ids_for_90pct_mean']:.1f}")

    results = []
    for label, config in configs.items():
        manifest = read_manifest(split_location(config.cache.path, "train"))
        row = {"setting": label, "bytes_per_token": manifest.committed_bytes
               / (manifest.num_sequences * manifest.seq_len)}
        decoded = {k: np.asarray(v).reshape(-1, *v.shape[2:])[real] for k, v in
                   _reader(split_location(config.cache.path, "eval")).read(rows).items()}
        if config.cache.mode == "topk":
            fid = reconstruction_stats(logits, decoded, info.vocab_size)
            row.update(kl_mean=float(fid["kl"].mean()), kl_p99=float(np.quantile(fid["kl"], 0.99)),
                       mass=float(fid["mass"].mean()), mean_k=float(fid["k"].mean()))
        else:
            row.update(kl_mean=float("nan"), kl_p99=float("nan"),
                       mass=float(sampled_mass(logits, decoded, info.vocab_size).mean()),
                       mean_k=float((decoded["teacher_sample_counts"] > 0).sum(-1).mean()))
        results.append(row)
    for row in results:
        row.update({f"student_{k}": v for k, v in
                    student_ce(configs[row["setting"]]).items() if k in ("ce_loss", "kl_loss")})
    hard = configs["top-k 64"]
    hard = dataclasses.replace(hard, run_dir=str(Path(hard.run_dir).parent / "hard-labels"),
                               loss=dataclasses.replace(hard.loss, alpha=0.0,
                                                        use_hard_labels=True))
    hard_ce = student_ce(hard)["ce_loss"]

    header = (f"{'setting':14} {'B/token':>8} {'KL mean':>8} {'KL p99':>8} {'mass':>6} "
              f"{'mean k':>7} {'student CE':>10}")
    print(f"\nfrontier (KL(teacher || reconstruction) and mass captured on the held-out tokens; "
          f"student: demo student, {args.student_steps} steps, held-out CE)")
    print(header)
    for r in results:
        print(f"{r['setting']:14} {r['bytes_per_token']:8.1f} {r['kl_mean']:8.4f} "
              f"{r['kl_p99']:8.3f} {r['mass']:6.3f} {r['mean_k']:7.1f} "
              f"{r.get('student_ce_loss', float('nan')):10.4f}")
    print(f"{'hard labels':14} {'':>8} {'':>8} {'':>8} {'':>6} {'':>7} {hard_ce:10.4f}")
    for label, why in missing.items():
        print(f"{label:14} not measured: {why}")

    top64 = configs["top-k 64"]
    reader = _reader(split_location(top64.cache.path, "train"))
    sample = np.arange(min(args.real_code_seqs, reader.manifest.num_sequences))
    stored = reader.read_stored(sample)
    ids = np.asarray(compress.decode({k: jax.numpy.asarray(v) for k, v in stored.items()},
                                     reader.manifest.target)["teacher_topk_ids"])
    codes = id_codes(stored, ids, reader.manifest.target)
    print(f"\nid and value codes, top-k 64 ids of {len(sample)} cached sequences (bytes/token; "
          f"ratio to today's code)")
    ids_now = next(v for k, v in codes.items() if k.startswith("gap lengths") and "(now)" in k)
    values_now = next(v for k, v in codes.items() if k.startswith("q8") and "(now)" in k)
    for name, per_token in codes.items():
        now = values_now if name.startswith("q8") else ids_now
        print(f"  {name:52} {per_token:7.2f}  {per_token / now:5.3f}")
    out = {"teacher": stats, "settings": results, "hard_label_ce": hard_ce, "codes": codes,
           "not_measured": missing}
    goals(out)
    return out


def _on_fixed_frontier(fixed: list[dict], x: float, key: str) -> float | None:
    """``key`` of the fixed top-k frontier at bytes/token ``x`` (linear between the measured
    points; None outside them)."""
    points = sorted((r["bytes_per_token"], r[key]) for r in fixed)
    xs, ys = zip(*points)
    return float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] else None


def goals(out: dict) -> None:
    """Prints the issue's goals as measured: met or not, with the figures."""
    rows = {r["setting"]: r for r in out["settings"]}
    fixed = [r for name, r in rows.items() if name.startswith("top-k")]
    budgets = [r for name, r in rows.items() if name.startswith("budget")]
    print("\ngoals")
    if "top-k 64" not in rows or not budgets:
        print("  not measured: no budgeted cache in this run")
        return
    ref = rows["top-k 64"]
    good = [r for r in budgets if r["kl_mean"] <= ref["kl_mean"]
            and r["bytes_per_token"] <= 0.7 * ref["bytes_per_token"]]
    print(f"  budget reconstructs as well as top-64 (KL {ref['kl_mean']:.4f}) at <= 0.7x its "
          f"{ref['bytes_per_token']:.1f} B/token: "
          + (", ".join(f"{r['setting']} ({r['bytes_per_token']:.1f} B, KL {r['kl_mean']:.4f})"
                       for r in good) if good else "NOT met"))
    for key, what in (("kl_mean", "KL"), ("student_ce_loss", "student CE")):
        for r in budgets:
            on_fixed = _on_fixed_frontier(fixed, r["bytes_per_token"], key)
            if on_fixed is None or key not in r:
                print(f"  {what}: {r['setting']} at {r['bytes_per_token']:.1f} B/token is "
                      f"outside the fixed top-k range: not compared")
                continue
            verdict = "below or equal: met" if r[key] <= on_fixed else "ABOVE: not met"
            print(f"  {what}: {r['setting']} at {r['bytes_per_token']:.1f} B/token "
                  f"{r[key]:.4f} vs fixed top-k there {on_fixed:.4f} ({verdict})")


if __name__ == "__main__":  # the teacher alone, ahead of a bench run
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/bench_cache_real")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--teacher-steps", type=int, default=400)
    args = parser.parse_args()
    print(prepare_teacher(Path(args.workdir), args.vocab, args.teacher_steps)[2])
