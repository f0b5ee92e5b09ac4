"""``kdpipe inspect``: what a cache, a run directory or a checkpoint directory holds.

A cache is found wherever ``cache.path`` may put one: a local directory or any TensorStore
kvstore URL (``pipeline.cache.store.kvstore_spec`` reads both). Run and checkpoint directories
are local.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cache.format import MANIFEST_KEY as MANIFEST
from pipeline.cache.store import open_kvstore, split_location
from pipeline.errors import KdpipeError


def _cache_split(location: str) -> list[str]:
    from pipeline.cache import read_manifest

    manifest = read_manifest(location)
    target = manifest.target
    committed = sorted(manifest.committed)
    sequences = sum(manifest.shard_range(s)[1] - manifest.shard_range(s)[0] for s in committed)
    stored = manifest.committed_bytes
    tokens = sequences * manifest.seq_len
    lines = [
        f"cache {location}",
        f"  stores      {target.stored}; values {target.value_dtype or '-'}, ids {target.id_encoding}, "
        f"T_cache {target.temperature if target.temperature is not None else 'any (full)'}",
        f"  vocab       {target.vocab_size} (tokenizer {target.tokenizer_vocab_size}), "
        f"seq_len {manifest.seq_len}, {manifest.num_sequences} sequences",
        f"  shards      {len(committed)} of {manifest.num_shards} committed "
        f"({manifest.shard_sequences} sequences each)"
        + ("" if len(committed) == manifest.num_shards else "  INCOMPLETE"),
        f"  size        {stored / 2**20:.2f} MiB committed"
        + (f", {stored / tokens:.1f} bytes/token" if tokens else ""),
        f"  teacher     {manifest.teacher_fingerprint}",
        f"  tokenizer   {manifest.tokenizer_fingerprint}",
        f"  dataset     {manifest.dataset_fingerprint}",
        f"  format      version {manifest.format_version}",
    ]
    return lines + _fidelity(manifest.commits)


def _fidelity(commits) -> list[str]:
    """The writers' fidelity audit (pipeline/cache/audit.py) over the committed shards: KL and
    captured mass token-weighted over their audited tokens, the largest shard p99, mean k."""
    audits = [c.audit for c in commits if c.audit]
    if not audits:
        return []
    lines = [f"  mean k      {sum(a['k_mean'] for a in audits) / len(audits):.2f} ids/token"]
    audited = [a for a in audits if "tokens" in a]
    if audited:
        tokens = sum(a["tokens"] for a in audited)
        kl = sum(a["kl_mean"] * a["tokens"] for a in audited) / tokens
        mass = sum(a["mass_mean"] * a["tokens"] for a in audited) / tokens
        worst = max(audited, key=lambda a: a["kl_p99"])
        lines += [f"  fidelity    KL(teacher || reconstruction) mean {kl:.4g} nats over {tokens} "
                  f"audited tokens ({len(audited)} shards), largest shard p99 {worst['kl_p99']:.4g}",
                  f"  captured    {mass:.4f} of the teacher's mass in the stored ids (mean)"]
    return lines


def _checkpoints(directory: Path) -> list[str]:
    from pipeline.checkpoint import read_checkpoint_metas

    metas = read_checkpoint_metas(directory)
    if not metas:
        return [f"checkpoints {directory}: none"]
    lines = [f"checkpoints {directory}: steps {sorted(metas)}"]
    latest = metas[max(metas)]
    position, identity = latest["position"], latest["identity"]
    lines += [f"  latest      step {position['step']}, global sample offset "
              f"{position['global_sample_offset']}",
              f"  config      hash {identity['config_hash']}",
              f"  student     {identity['model_fingerprint']}",
              f"  dataset     {identity['dataset_fingerprint']}"]
    return lines


def _run_dir(directory: Path) -> list[str]:
    from pipeline.metrics import read_metrics

    lines = [f"run {directory}"]
    records = read_metrics(directory)
    for split in ("train", "eval"):
        last = [r for r in records if r["split"] == split]
        if last:
            values = {k: round(v, 4) for k, v in last[-1].items() if k not in ("split",)}
            lines.append(f"  last {split:<6}{json.dumps(values)}")
    for name in ("student", "report.md"):
        if (directory / name).exists():
            lines.append(f"  {name:<12}{directory / name}")
    return lines + _checkpoints(directory / "checkpoints")


def _cache_splits(location: str) -> list[str]:
    """The cache splits at ``location``: itself when it holds a manifest, else those of its
    train/ and eval/ that do (none: not a cache)."""
    kvstore = open_kvstore(location)
    if kvstore.read(MANIFEST).result().state == "value":
        return [location]
    return [split_location(location, split) for split in ("train", "eval")
            if kvstore.read(f"{split}/{MANIFEST}").result().state == "value"]


def describe(location: str) -> str:
    """A human summary of ``location``: a cache split or a cache with train/eval splits (a
    local path or a kvstore URL), a run directory or a checkpoint directory (local paths).
    KdpipeError when it is none of these."""
    path, local = Path(location), "://" not in location
    splits = _cache_splits(location) if path.is_dir() or not local else []
    if splits:
        return "\n".join(line for split in splits for line in _cache_split(split))
    if not local:
        raise KdpipeError(f"path: {location} holds no cache (no {MANIFEST} there or under "
                          f"train/ or eval/); run and checkpoint directories are read from "
                          f"local paths only")
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists():
        return "\n".join(_run_dir(path))
    if path.is_dir() and any(p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
                             for p in path.iterdir()):
        return "\n".join(_checkpoints(path))
    raise KdpipeError(f"path: {path} is not a cache (no {MANIFEST}), a run directory (no "
                      f"checkpoints/ or metrics.jsonl) or a checkpoint directory")
