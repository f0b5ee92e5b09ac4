"""Real teacher outputs for ``bench_cache.py --real``: the demo's teacher, cached on the demo corpus.

Everything is built through the pipeline's own API (the steps of actors/demo.py) in a work
directory that later runs reuse (each step is skipped when its output exists):

1. a byte-level BPE tokenizer of ``--real-vocab`` ids (32,768 by default, so that ids cost what
   they cost at real vocabularies) trained on the standard library's sources, tests left out
   (:func:`tokenizer_sources`; the demo's 80 modules alone yield only about 18,000 merges);
2. a small dataset of the demo's smallest files (``--real-kb`` of text, that tokenizer), the
   one the caches and the students use, a fifth of its files held out;
3. the demo's teacher pretrained on all of that text, held-out files included
   (``actors.demo.demo_configs``, ``pipeline.train.train``, ``--teacher-steps`` at
   ``demo.teacher_learning_rate``). A teacher that has seen the text it is cached on is peaky
   there, as a pretrained teacher is on public code: the demo's 4-layer, 128-wide teacher
   trained on the whole demo corpus for 200 steps stayed nearly flat (top-1 mass 0.08,
   held-out CE 6.12 nats) where a 135M Llama-family teacher on Python source gives top-1 0.60,
   and on 2 CPU cores a model that learns a whole corpus that well is out of reach. One pass
   of the teacher over each batch of the cached text feeds one ``pipeline.cache.CacheWriter``
   per setting (``pipeline.cache.compress`` encodes on the device), so every setting stores the
   same teacher outputs;
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


def prepare_teacher(workdir: Path, vocab: int, teacher_steps: int, kilobytes: float,
                    overrides=()):
    """Tokenizer and the demo's teacher trained on the :func:`bench_sources` of ``kilobytes``
    (every file, none held out) in ``workdir`` (made or reused). Returns (the demo config,
    the demo's file selection, the teacher's directory)."""
    from actors.demo import demo_configs, stdlib_sources
    from pipeline.data import prepare_dataset, train_bpe_tokenizer
    from pipeline.train import train

    config = demo_config(workdir, vocab, teacher_steps, overrides)
    sources = stdlib_sources(config.demo.max_files)
    if not Path(config.data.tokenizer).exists():
        train_bpe_tokenizer(tokenizer_sources(), vocab, config.data.tokenizer)
    text = workdir / f"text-{kilobytes:g}kB"
    teacher = demo_configs(config, bench_sources(sources, kilobytes))["teacher"]
    lr = teacher.optimizer.learning_rate
    teacher = dataclasses.replace(
        teacher, run_dir=str(text / f"teacher-{teacher_steps}steps-lr{lr:g}"),
        data=dataclasses.replace(teacher.data, eval_fraction=0.0,
                                 prepared_dir=str(text / "teacher-data")))
    if not (Path(teacher.data.prepared_dir) / "metadata.json").exists():
        prepare_dataset(teacher.data, progress=False)
    teacher_dir = Path(teacher.run_dir) / "student"
    if not (teacher_dir / "config.json").exists():
        train(teacher)
    return config, sources, teacher_dir


# Top-64 with format 3's value code (q8, a per-token scale), beside top-64 with the default
# one (q8sqrt) that every other setting uses: printed for reference, never the goals' baseline.
Q8_REFERENCE = "top-k 64 q8"
# The budget set at this fraction of top-64's stored bytes (the goal's), once those are measured.
GOAL_FRACTION = 0.7


def settings(kmax: int, quick: bool = False) -> list[tuple[str, dict]]:
    """The cache settings of the frontier: (label, cache config fields); ``quick``: top-k 16
    and 64 and the q8 reference (with :func:`goal_budget`, the goal's comparison)."""
    rows = [(f"top-k {k}", {"mode": "topk", "k": k}) for k in (8, 16, 32, 64, 128)]
    rows += [(Q8_REFERENCE, {"mode": "topk", "k": 64, "value_dtype": "q8"})]
    rows += [(f"top-p {p}", {"mode": "topk", "k": kmax, "top_p": p}) for p in (0.9, 0.95, 0.99)]
    rows += [(f"budget {b} B", {"mode": "topk", "k": kmax, "bytes_per_token": float(b)})
             for b in (40, 60, 70, 80, 100, 140)]
    rows += [("sampled n=12", {"mode": "sampled", "n_draws": 12})]
    quick_rows = ("top-k 16", "top-k 64", Q8_REFERENCE)
    return [row for row in rows if not quick or row[0] in quick_rows]


def goal_budget(top64_bytes: float, kmax: int) -> tuple[str, dict]:
    """The budget setting at :data:`GOAL_FRACTION` of top-64's measured stored bytes/token
    (whole bytes, rounded down)."""
    budget = float(np.floor(GOAL_FRACTION * top64_bytes))
    return (f"budget {GOAL_FRACTION:g}x top-64", {"mode": "topk", "k": kmax,
                                                   "bytes_per_token": budget})


def is_fixed(label: str) -> bool:
    """The fixed top-k frontier (the default value code)."""
    return label.startswith("top-k") and label != Q8_REFERENCE


def has_student(label: str) -> bool:
    """Students are trained on the settings the goals compare (fixed top-k and budgets)."""
    return is_fixed(label) or label.startswith("budget")


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


def bench_config(config, sources: list[str], teacher_dir: Path, workdir: Path,
                 kilobytes: float, steps: int):
    """The distilled student's run of the demo on :func:`bench_sources` (a fifth of the files
    held out) from the teacher in ``teacher_dir``, ``steps`` steps (warm-up at most a quarter
    of them), evaluated once at the end."""
    from actors.demo import demo_configs

    distilled = demo_configs(config, sources)["distilled"]
    distilled = dataclasses.replace(distilled, model=dataclasses.replace(
        distilled.model, teacher=dataclasses.replace(distilled.model.teacher,
                                                     path=str(teacher_dir))))
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


# Sequences per shard: a shard's index has an entry per sequence, present or not, so the
# default 256 would add 16 B per absent sequence and array to this small text's last shard.
SHARD_SEQUENCES = 16


def setting_config(base, label: str, fields: dict):
    """``base`` caching and distilling with the cache of one setting, beside its data
    (CacheConfig refuses bad fields with a ConfigError; a field this kdpipe lacks is a
    TypeError)."""
    slug = label.replace(" ", "-").replace("=", "")
    root = Path(base.data.prepared_dir).parent
    cache = dataclasses.replace(base.cache, path=str(root / "caches" / slug),
                                shard_sequences=SHARD_SEQUENCES, chunk_sequences=1, **fields)
    return dataclasses.replace(base, cache=cache, run_dir=str(
        root / f"students-{base.train.steps}" / slug))


def teacher_forward():
    import jax

    return jax.jit(lambda state, batch: state.model()(
        batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def fill_caches(configs: dict, teacher, teacher_fp: str, split: str, batch: int) -> float:
    """Cache ``split`` for every config of ``configs`` from one teacher pass per batch (each
    logits batch goes to every setting's CacheWriter). Complete caches are kept; a partial one,
    or one another kdpipe wrote (another header), is filled again from scratch, and the
    student trained on it is trained again. Returns the seconds spent."""
    import shutil
    import time

    from pipeline.cache import CacheWriter, split_location
    from pipeline.data import TokenDataset, read_info
    from pipeline.errors import CacheError
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
        try:
            writer = CacheWriter(location, manifest)
        except CacheError:  # written by another kdpipe (format version, fields)
            shutil.rmtree(location)
            writer = CacheWriter(location, manifest)
        if not writer.pending_shards(range(manifest.num_shards)):
            writer.close()
            continue
        if writer.committed_shards:
            writer.close()
            shutil.rmtree(location)
            writer = CacheWriter(location, manifest)
        shutil.rmtree(config.run_dir, ignore_errors=True)  # its student read the old cache
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


def _teacher_token_stats(logits: np.ndarray, real_vocab: int) -> dict:
    x = np.asarray(logits, np.float64)[:, :real_vocab]
    lp = x - x.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    p = np.exp(lp)
    top = -np.sort(-p, -1)
    return {"entropy": -(p * lp).sum(-1), "top1": top[:, 0], "top64": top[:, :64].sum(-1),
            "need90": (np.cumsum(top, -1) < 0.9).sum(-1) + 1.0}


def teacher_stats(logits: np.ndarray, real_vocab: int) -> dict:
    """Entropy, top-1 and top-64 mass, ids needed for 90% of the mass (median, mean)."""
    per_token = in_chunks(_teacher_token_stats, logits, None, real_vocab)
    return {"entropy_nats": float(per_token["entropy"].mean()),
            "top1": float(per_token["top1"].mean()),
            "top64_mass": float(per_token["top64"].mean()),
            "ids_for_90pct_median": float(np.median(per_token["need90"])),
            "ids_for_90pct_mean": float(per_token["need90"].mean())}


# Tokens per float64 pass over the vocabulary (a [512, 32768] float64 array is 128 MiB).
CHUNK_TOKENS = 512


def in_chunks(fn, logits: np.ndarray, targets: dict | None, real_vocab: int):
    """``fn(logits, targets, real_vocab)`` (or ``fn(logits, real_vocab)`` without targets) on
    :data:`CHUNK_TOKENS` tokens at a time, per-token results concatenated (an array, or a dict
    of them), so that memory stays bounded whatever the number of held-out tokens."""
    parts = []
    for first in range(0, len(logits), CHUNK_TOKENS):
        chunk = slice(first, first + CHUNK_TOKENS)
        parts.append(fn(logits[chunk], real_vocab) if targets is None else
                     fn(logits[chunk], {k: v[chunk] for k, v in targets.items()}, real_vocab))
    if isinstance(parts[0], dict):
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return np.concatenate(parts)


def bytes_per_token(config, split: str = "train") -> float:
    """Stored bytes/token of a setting's cache of ``split``: its committed shard files."""
    from pipeline.cache import read_manifest, split_location

    manifest = read_manifest(split_location(config.cache.path, split))
    return manifest.committed_bytes / (manifest.num_sequences * manifest.seq_len)


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
    import cache_codes
    from pipeline.cache import split_location
    from pipeline.data import TokenDataset, prepare_dataset, read_info
    from pipeline.errors import KdpipeError
    from pipeline.models.build import build_model
    from pipeline.models.hf_io import teacher_fingerprint
    from pipeline.step import TrainState

    workdir = Path(args.real_workdir)
    config, sources, teacher_dir = prepare_teacher(workdir, args.real_vocab, args.teacher_steps,
                                                   args.real_kb, args.real_set)
    # (no students: the caches' settings are those of a 1-step student's run)
    base = bench_config(config, sources, teacher_dir, workdir, args.real_kb,
                        max(args.student_steps, 1))
    if not (Path(base.data.prepared_dir) / "metadata.json").exists():
        prepare_dataset(base.data, progress=False)
    info = read_info(base.data.prepared_dir)
    if not info.splits["eval"]["num_rows"]:
        raise SystemExit(f"--real-kb {args.real_kb}: no file of that text is held out; take more")
    configs, missing = {}, {}
    for label, fields in settings(args.real_kmax, args.quick):
        try:
            configs[label] = setting_config(base, label, fields)
        except (TypeError, KdpipeError) as e:  # a field this kdpipe lacks, or refuses
            missing[label] = str(e)
    teacher = build_model(base.model.teacher, frozen=True)
    teacher_fp = teacher_fingerprint(teacher_dir)

    def fill(chosen: dict) -> float:
        return sum(fill_caches(chosen, teacher, teacher_fp, split, base.train.global_batch_size)
                   for split in ("train", "eval"))

    fill_s = fill(configs)
    # the goal's budget, at its fraction of top-64's stored bytes as just measured
    label, fields = goal_budget(bytes_per_token(configs["top-k 64"]), args.real_kmax)
    configs[label] = setting_config(base, label, fields)
    fill_s += fill({label: configs[label]})
    print(f"\nreal teacher outputs: tokenizer {info.vocab_size} ids; teacher {teacher_dir} "
          f"(demo config, {args.teacher_steps} steps on all of the cached text); cached data: "
          f"the smallest demo files up to {args.real_kb:g} kB, train "
          f"{info.splits['train']['num_rows']} x {info.seq_len} tokens, eval "
          f"{info.splits['eval']['num_rows']} x {info.seq_len}; caches filled in "
          f"{fill_s:.0f} s (0 = reused)")

    # the teacher's dense logits on held-out tokens, against which every setting is measured
    held_out = info.splits["eval"]["num_rows"]
    rows = np.arange(min(args.real_fidelity_seqs or held_out, held_out))
    batch = TokenDataset(base.data.prepared_dir, "eval", vocab_size=teacher.config.vocab_size
                         ).read_rows(rows)
    logits = np.asarray(teacher_forward()(TrainState.create(teacher), batch), np.float32)
    real = batch["attention_mask"].reshape(-1) > 0
    # at the caches' temperature (loss.temperature), the distribution they store
    logits = logits.reshape(-1, logits.shape[-1])[real] / base.loss.temperature
    stats = teacher_stats(logits, info.vocab_size)
    print(f"teacher at T = {base.loss.temperature:g} on {len(logits)} of the students' "
          f"held-out tokens: entropy {stats['entropy_nats']:.2f} nats, "
          f"top-1 {stats['top1']:.2f}, top-64 mass {stats['top64_mass']:.3f}, ids for 90% of the "
          f"mass: median {stats['ids_for_90pct_median']:.0f}, mean "
          f"{stats['ids_for_90pct_mean']:.1f}")

    results = []
    for label, config in configs.items():
        row = {"setting": label, "bytes_per_token": bytes_per_token(config),
               "held_out_bytes_per_token": bytes_per_token(config, "eval")}
        decoded = {k: np.asarray(v).reshape(-1, *v.shape[2:])[real] for k, v in
                   _reader(split_location(config.cache.path, "eval")).read(rows).items()}
        if config.cache.mode == "topk":
            fid = in_chunks(reconstruction_stats, logits, decoded, info.vocab_size)
            row.update(kl_mean=float(fid["kl"].mean()), kl_p99=float(np.quantile(fid["kl"], 0.99)),
                       mass=float(fid["mass"].mean()), mean_k=float(fid["k"].mean()))
        else:
            row.update(kl_mean=float("nan"), kl_p99=float("nan"),
                       mass=float(in_chunks(sampled_mass, logits, decoded,
                                            info.vocab_size).mean()),
                       mean_k=float((decoded["teacher_sample_counts"] > 0).sum(-1).mean()))
        results.append(row)
    hard_ce = float("nan")
    if args.student_steps:
        for row in filter(lambda r: has_student(r["setting"]), results):
            row.update({f"student_{k}": v for k, v in student_ce(configs[row["setting"]]).items()
                        if k in ("ce_loss", "kl_loss")})
        hard = configs["top-k 64"]
        hard = dataclasses.replace(hard, run_dir=str(Path(hard.run_dir).parent / "hard-labels"),
                                   loss=dataclasses.replace(hard.loss, alpha=0.0,
                                                            use_hard_labels=True))
        hard_ce = student_ce(hard)["ce_loss"]

    header = (f"{'setting':20} {'B/token':>8} {'held out':>8} {'KL mean':>8} {'KL p99':>8} "
              f"{'mass':>6} {'mean k':>7} {'student CE':>10}")
    print(f"\nfrontier (B/token of the train caches and of the held-out ones; KL(teacher || "
          f"reconstruction) and mass captured on the held-out tokens; "
          f"student: demo student, {args.student_steps} steps, held-out CE; fixed top-k and "
          f"budgets only; values q8sqrt but in {Q8_REFERENCE!r})")
    print(header)
    for r in results:
        print(f"{r['setting']:20} {r['bytes_per_token']:8.1f} "
              f"{r['held_out_bytes_per_token']:8.1f} {r['kl_mean']:8.4f} "
              f"{r['kl_p99']:8.3f} {r['mass']:6.3f} {r['mean_k']:7.1f} "
              f"{r.get('student_ce_loss', float('nan')):10.4f}")
    print(f"{'hard labels':20} {'':>8} {'':>8} {'':>8} {'':>8} {'':>6} {'':>7} {hard_ce:10.4f}")
    for label, why in missing.items():
        print(f"{label:20} not measured: {why}")

    codes = cache_codes.compare_codes(
        _reader(split_location(configs["top-k 64"].cache.path, "train")),
        _reader(split_location(configs[Q8_REFERENCE].cache.path, "train")), args.real_code_seqs)
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


def frontier_reaches(points: list[tuple[float, float]], kl: float) -> float | None:
    """Bytes/token at which a (bytes/token, KL) frontier first reaches ``kl``, linear between
    its points (None: not within them)."""
    points = sorted(points)
    for (b0, k0), (b1, k1) in zip(points, points[1:]):
        if k0 > kl >= k1:
            return b0 + (b1 - b0) * (k0 - kl) / (k0 - k1)
    return None


def goals(out: dict) -> None:
    """Prints the issue's goals as measured: met or not, with the figures."""
    rows = {r["setting"]: r for r in out["settings"]}
    fixed = [r for name, r in rows.items() if is_fixed(name)]
    budgets = [r for name, r in rows.items() if name.startswith("budget")]
    print("\ngoals")
    if "top-k 64" not in rows or not budgets:
        print("  not measured: no budgeted cache in this run")
        return
    ref = rows["top-k 64"]
    if Q8_REFERENCE in rows:
        old = rows[Q8_REFERENCE]
        print(f"  top-64's values: q8sqrt {ref['bytes_per_token']:.1f} B/token, KL "
              f"{ref['kl_mean']:.4f}; q8 (format 3) {old['bytes_per_token']:.1f} B/token, KL "
              f"{old['kl_mean']:.4f}: bytes {ref['bytes_per_token'] / old['bytes_per_token']:.3f}x")
    good = [r for r in budgets if r["kl_mean"] <= ref["kl_mean"]
            and r["bytes_per_token"] <= GOAL_FRACTION * ref["bytes_per_token"]]
    print(f"  budget reconstructs as well as top-64 (KL {ref['kl_mean']:.4f}) at <= "
          f"{GOAL_FRACTION:g}x its {ref['bytes_per_token']:.1f} B/token: "
          + (", ".join(f"{r['setting']} ({r['bytes_per_token']:.1f} B = "
                       f"{r['bytes_per_token'] / ref['bytes_per_token']:.3f}x, KL "
                       f"{r['kl_mean']:.4f})" for r in good) if good else "NOT met"))
    # where the budgets' frontier (linear between measured budgets) reaches top-64's KL: on
    # the train caches' bytes (the goal's basis), and on the held-out caches' own bytes, the
    # tokens the KL is measured on
    for key, basis in (("bytes_per_token", ""), ("held_out_bytes_per_token",
                                                 " on the held-out tokens' own bytes")):
        at = frontier_reaches([(r[key], r["kl_mean"]) for r in budgets], ref["kl_mean"])
        if at is not None:
            print(f"  the budgets' frontier reaches top-64's KL{basis} at {at:.1f} B/token "
                  f"(interpolated): {at / ref[key]:.2f}x its {ref[key]:.1f}")
    for key, what in (("kl_mean", "KL"), ("student_ce_loss", "student CE")):
        if not all(key in r for r in fixed + budgets):
            print(f"  {what}: not measured (no students in this run)")
            continue
        for r in budgets:
            on_fixed = _on_fixed_frontier(fixed, r["bytes_per_token"], key)
            if on_fixed is None:
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
    parser.add_argument("--kb", type=float, default=24)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    print(prepare_teacher(Path(args.workdir), args.vocab, args.teacher_steps, args.kb,
                          args.set)[2])
