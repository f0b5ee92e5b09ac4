"""Pure, jittable encode/decode of teacher targets (no I/O).

``encode(logits [B, L, V], sequence_indices [B], spec)`` returns the stored arrays of
:func:`pipeline.cache.format.array_layout` (each ``[B, L, *trailing]``; a ``bytes_per_token``
spec's candidates, :func:`encoded_layout`, which :func:`cut` turns into stored arrays) and
``decode(stored, spec)`` returns the batch keys of pipeline/losses/targets.py. ``spec`` is
static. Both are jitted (encode one sequence per compiled call, see :func:`encode`).

Codes, per token:

- teacher distribution: p = softmax(logits / T_cache) over the real ids (ids >=
  tokenizer_vocab_size get probability 0 before anything is chosen or drawn).
- ids, ``packed``: each id in ceil(log2 V) bits, concatenated LSB-first into a byte row.
- ids, ``gap``: ids sorted ascending, gaps g_i = id_i - id_{i-1} - 1 (id_{-1} = -1). Format 3
  stores the gaps themselves (``id_gaps``, uint16 up to a 65,536-id vocabulary, else uint32),
  which the cache keeps token-major and byte-shuffled (pipeline/cache/format.py). Formats 1
  and 2 store each gap as its bit length b_i (a byte, ``id_gap_lengths``) and its b_i - 1 bits
  below the leading one (``id_stream``), as DEFLATE codes distances: a bucket plus extra bits.
  Decoding is parallel either way (a cumulative sum).
- topk values (log-probs, in the ids' order): float32, bfloat16, ``q8``: q = round(-lp / s)
  in [0, 255] with s = -min(lp) / 255 per token (stored as bf16), or ``q8sqrt`` (format 4's
  default): one fixed code, no per-token scale, whose levels are uniform in sqrt(p) (level n:
  sqrt(p) = 1 - n / 100) down to p = 4e-4, then 1 nat apart in log p
  (:func:`quantize_sqrt_logprobs`). A rounding error d (|d| <= SQRT_STEP / 2) in sqrt(p) is
  an error of about 2 d / sqrt(p) in log p, and the KL it adds, about p (log-p error)^2 / 2
  after renormalisation, does not depend on p: at most SQRT_STEP^2 / 2 per id (SQRT_STEP^2 / 6
  on average; the log steps below p = 4e-4 add at most as much). So rare ids, whose values
  matter little, get coarse levels, which zstd codes in few bits (on the real teacher outputs
  of ``bench_cache.py --real``, top-64 values take about 0.6 B each instead of q8's 0.96, and
  the KL they add is a few percent of top-64's truncation KL). The tail log-mass
  log(sum_{v not in top k} p_v) is summed directly (so it is exactly -inf when k covers the
  vocab). Lossy values are renormalised at decode so that the k values and the tail sum to 1.
- adaptive topk (``top_p`` / ``bytes_per_token``): the k candidates are cut to k_t per token;
  the cut ones join the tail (summed directly), the unused slots hold zeros and ``id_count``
  holds k_t (pipeline/cache/ragged.py stores only the used slots). ``top_p`` cuts each token
  on its own, here (:func:`kept_counts`). ``bytes_per_token`` shares bytes between tokens, so
  the encoder gives the k **candidates** (:func:`candidate_layout`) and
  ``pipeline.cache.budget.cut`` picks k_t on the host, over a sequence or a whole shard, and
  cuts them (:func:`cut`).
- sampled: n ids drawn i.i.d. from p by inverse CDF with a key per (seed, sequence, position),
  so a re-run draws the same ids; stored as sorted unique ids, counts (uint8, unused slots 0
  with id 0) and the teacher entropy H(p) in f32. (A cumulative sum in f32 resolves
  probabilities down to about 1e-7; rarer ids are drawn with a slightly wrong probability.)
- full: the logits (padded ids set to PADDED_LOGIT) in float32 or bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.cache.format import (PADDED_LOGIT, TargetSpec, array_layout, id_bits,
                                   mantissa_bytes)
from pipeline.losses import restrict_to_vocab

# q8 log-probs are clamped here so that the per-token scale stays finite (e^-100 ~ 0 in f32);
# q8sqrt's, so that every level fits in a byte.
Q8_LOGPROB_FLOOR = -100.0
# q8sqrt: levels 0..SQRT_LEVELS are sqrt(p) = 1 - n * SQRT_STEP (down to sqrt(p) = 0.02); the
# levels after them step log p by what one sqrt step is there (1 nat), down to the floor.
SQRT_STEP = 0.01
SQRT_LEVELS = 98
_SQRT_LAST_LOGPROB = 2 * np.log(1 - SQRT_LEVELS * SQRT_STEP)
_LOG_STEP = 2 * SQRT_STEP / (1 - SQRT_LEVELS * SQRT_STEP)


def scaled_logits(logits: jax.Array, spec: TargetSpec) -> jax.Array:
    """logits / T_cache in f32 with padded ids at -inf (``pipeline.losses.restrict_to_vocab``,
    the definition every teacher source shares). [..., V] -> [..., V]."""
    return restrict_to_vocab(logits.astype(jnp.float32) / spec.temperature,
                             spec.tokenizer_vocab_size)


def pack_bits(values: jax.Array, widths: jax.Array, num_bytes: int) -> jax.Array:
    """Concatenate values[t, i] (widths[t, i] <= 25 bits each) LSB-first into bytes.

    [T, m] uint32, [T, m] int32 -> [T, num_bytes] uint8 (num_bytes * 8 >= sum of widths).
    """
    offsets = jnp.cumsum(widths, axis=-1) - widths
    shifted = values.astype(jnp.uint32) << (offsets % 8).astype(jnp.uint32)
    # a code of <= 25 bits starting at bit offset%8 <= 7 touches at most 4 bytes
    byte_index = (offsets // 8)[..., None] + jnp.arange(4)
    byte_value = (shifted[..., None] >> (8 * jnp.arange(4, dtype=jnp.uint32))) & 0xFF

    def row(index, value):
        # codes never overlap, so adding their bytes is OR-ing them
        out = jnp.zeros(num_bytes + 4, jnp.uint32).at[index.reshape(-1)].add(value.reshape(-1))
        return out[:num_bytes].astype(jnp.uint8)

    return jax.vmap(row)(byte_index, byte_value)


def unpack_bits(packed: jax.Array, widths: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_bits`: [T, C] uint8, [T, m] int32 -> [T, m] uint32."""
    offsets = jnp.cumsum(widths, axis=-1) - widths
    padded = jnp.pad(packed.astype(jnp.uint32), ((0, 0), (0, 4)))
    index = (offsets // 8)[..., None] + jnp.arange(4)
    window_bytes = jnp.take_along_axis(padded, index.reshape(index.shape[0], -1), axis=-1)
    window_bytes = window_bytes.reshape(index.shape) << (8 * jnp.arange(4, dtype=jnp.uint32))
    window = window_bytes[..., 0] | window_bytes[..., 1] | window_bytes[..., 2] | window_bytes[..., 3]
    mask = (jnp.uint32(1) << widths.astype(jnp.uint32)) - 1
    return (window >> (offsets % 8).astype(jnp.uint32)) & mask


def _bit_length(x: jax.Array) -> jax.Array:
    return (32 - jax.lax.clz(x.astype(jnp.uint32))).astype(jnp.int32)


def encode_ids(ids: jax.Array, used: jax.Array, spec: TargetSpec) -> dict[str, jax.Array]:
    """[T, m] int32 ids (ascending where used for "gap"; unused slots last) -> stored arrays."""
    capacity = mantissa_bytes(spec)
    if spec.id_encoding == "packed":
        widths = jnp.full(ids.shape, id_bits(spec.vocab_size), jnp.int32)
        return {"id_stream": pack_bits(jnp.where(used, ids, 0), widths, capacity)}
    previous = jnp.concatenate([jnp.full_like(ids[:, :1], -1), ids[:, :-1]], axis=-1)
    gaps = jnp.where(used, ids - previous - 1, 0).astype(jnp.uint32)
    if spec.gap_ids:
        return {"id_gaps": gaps.astype(array_dtype(spec, "id_gaps"))}
    lengths = _bit_length(gaps)
    leading_one = jnp.where(lengths > 0, jnp.uint32(1) << jnp.maximum(lengths - 1, 0), 0)
    stream = pack_bits(gaps - leading_one, jnp.maximum(lengths - 1, 0), capacity)
    return {"id_gap_lengths": lengths.astype(jnp.uint8), "id_stream": stream}


def decode_ids(stored: dict[str, jax.Array], spec: TargetSpec) -> jax.Array:
    """Stored id arrays [T, ...] -> [T, m] int32 ids (unused slots: whatever the code gives)."""
    if spec.id_encoding == "packed":
        shape = (stored["id_stream"].shape[0], spec.slots)
        widths = jnp.full(shape, id_bits(spec.vocab_size), jnp.int32)
        return unpack_bits(stored["id_stream"], widths).astype(jnp.int32)
    if spec.gap_ids:
        return jnp.cumsum(stored["id_gaps"].astype(jnp.int32) + 1, axis=-1) - 1
    lengths = stored["id_gap_lengths"].astype(jnp.int32)
    extra = unpack_bits(stored["id_stream"], jnp.maximum(lengths - 1, 0))
    leading_one = jnp.where(lengths > 0, jnp.uint32(1) << jnp.maximum(lengths - 1, 0), 0)
    gaps = (leading_one + extra).astype(jnp.int32)
    return jnp.cumsum(gaps + 1, axis=-1) - 1


def quantize_logprobs(logprobs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[T, k] f32 log-probs (<= 0) -> ([T, k] uint8 q, [T] bf16 scale), lp ~ -q * scale."""
    lp = jnp.maximum(logprobs, Q8_LOGPROB_FLOOR)
    # bf16 keeps 8 significant bits: inflating by 2**-7 before rounding makes the stored
    # scale >= the exact one, so -min(lp) / scale <= 255 and nothing is clipped
    scale = (jnp.maximum(-jnp.min(lp, axis=-1), 1e-30) / 255.0 * (1 + 2**-7)).astype(jnp.bfloat16)
    q = jnp.clip(jnp.round(-lp / scale.astype(jnp.float32)[:, None]), 0, 255)
    return q.astype(jnp.uint8), scale


def dequantize_logprobs(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Inverse of :func:`quantize_logprobs` up to rounding: -> [T, k] f32."""
    return -q.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]


def quantize_sqrt_logprobs(logprobs: jax.Array) -> jax.Array:
    """[..., k] f32 log-probs (<= 0) -> [..., k] uint8 q8sqrt levels (module docstring): the
    nearest level in sqrt(p) down to level SQRT_LEVELS, then the nearest log-p step."""
    lp = jnp.maximum(logprobs, Q8_LOGPROB_FLOOR)
    root_level = jnp.round(-jnp.expm1(lp / 2) / SQRT_STEP)
    log_level = SQRT_LEVELS + jnp.maximum(1, jnp.round((_SQRT_LAST_LOGPROB - lp) / _LOG_STEP))
    return jnp.where(root_level <= SQRT_LEVELS, root_level, log_level).astype(jnp.uint8)


def dequantize_sqrt_logprobs(q: jax.Array) -> jax.Array:
    """Inverse of :func:`quantize_sqrt_logprobs` up to rounding: -> [..., k] f32 log-probs."""
    n = q.astype(jnp.float32)
    root = 2 * jnp.log1p(-jnp.minimum(n, SQRT_LEVELS) * SQRT_STEP)
    return jnp.where(n <= SQRT_LEVELS, root,
                     _SQRT_LAST_LOGPROB - (n - SQRT_LEVELS) * _LOG_STEP)


def candidate_layout(spec: TargetSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """What the encoder gives per token for a ``bytes_per_token`` spec, {name: (trailing
    shape, dtype)}: the k candidates by descending probability (``cand_ids``), their logits
    less the peak (``cand_relative``), the other ids' exp(logit - peak) summed
    (``cand_tail_mass``), the log of all of it (``cand_log_total``), and the statistic of the
    other ids that the audit needs (``cand_tail_kl``, ``pipeline.cache.audit``), all exact
    float32 (never recomputed from stored values)."""
    return {"cand_ids": ((spec.k,), "int32"), "cand_relative": ((spec.k,), "float32"),
            "cand_tail_mass": ((), "float32"), "cand_log_total": ((), "float32"),
            "cand_tail_kl": ((), "float32")}


def encoded_layout(spec: TargetSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """What :func:`encode` gives per token, {name: (trailing shape, dtype)}: the stored arrays
    (``array_layout``), or a ``bytes_per_token`` spec's candidates (:func:`candidate_layout`)."""
    if spec.cut_on_host:
        return candidate_layout(spec)
    return {a.name: (a.trailing, a.dtype) for a in array_layout(spec)}


def _encode_topk(x: jax.Array, spec: TargetSpec) -> dict[str, jax.Array]:
    """[T, V] scaled logits -> stored arrays (``bytes_per_token``: the candidates). One top-k
    and one fused pass over the vocab."""
    top, ids = jax.lax.top_k(x, spec.k)
    # without the barrier XLA:CPU fuses top_k into the passes below and runs ~30x slower
    top, x = jax.lax.optimization_barrier((top, x))
    peak, kth = top[:, :1], top[:, -1:]
    weights = jnp.exp(x - peak)
    total = jnp.sum(weights, axis=-1)
    # the tail summed directly (precise when it is tiny, exactly 0 when k covers the vocab):
    # ids strictly below the k-th value, plus ids tied with it that top_k left out
    below = x < kth
    tail_mass = jnp.sum(jnp.where(below, weights, 0.0), axis=-1)
    left_out_ties = jnp.sum(x == kth, axis=-1) - jnp.sum(top == kth, axis=-1)
    kth_weight = jnp.exp(kth - peak)[:, 0]
    tail_mass = tail_mass + left_out_ties * kth_weight
    relative, log_total = top - peak, jnp.log(total)
    if spec.cut_on_host:
        # sum over the other real ids of p_v (log p_v - c), c = log(their mean probability),
        # term by term: with it the audit's KL of any cut needs no logits (pipeline.cache.audit)
        shift = (jnp.log(tail_mass) - jnp.log(float(spec.tokenizer_vocab_size - spec.k)))[:, None]
        terms = jnp.where(below & (weights > 0), weights * (x - peak - shift), 0.0)
        ties = jnp.where(left_out_ties > 0,
                         left_out_ties * kth_weight * (kth - peak - shift)[:, 0], 0.0)
        return {"cand_ids": ids, "cand_relative": relative, "cand_tail_mass": tail_mass,
                "cand_log_total": log_total,
                "cand_tail_kl": (jnp.sum(terms, axis=-1) + ties) / total}
    count = kept_counts(relative - log_total[:, None], spec) if spec.adaptive else None
    return _cut_topk(ids, relative, tail_mass, log_total, count, spec)


def kept_order(ids: jax.Array, used: jax.Array, spec: TargetSpec) -> jax.Array | None:
    """The order in which the stored slots hold a token's kept candidates ``[..., k]``
    (``ids`` by descending probability, ``used`` the kept ones): ascending ids with the unused
    slots last for the gap code; None (as they come) for the packed one."""
    if spec.id_encoding != "gap":
        return None
    return jnp.argsort(jnp.where(used, ids, spec.vocab_size), axis=-1)


def _cut_topk(ids: jax.Array, relative: jax.Array, tail_mass: jax.Array, log_total: jax.Array,
              count: jax.Array | None, spec: TargetSpec) -> dict[str, jax.Array]:
    """Stored arrays of the k candidates of each token, cut to ``count`` ``[T]`` (None: all).
    ids ``[T, k]`` by descending probability; relative: their logits less the peak; tail_mass:
    the other ids' exp(logit - peak) summed; log_total: log of all of it (``[T]`` each)."""
    values = relative - log_total[:, None]
    used = jnp.ones(ids.shape, bool)
    if count is not None:
        used = jnp.arange(spec.k) < count[:, None]
        # the dropped candidates join the tail, summed directly (no 1 - kept mass)
        tail_mass = tail_mass + jnp.sum(jnp.where(used, 0.0, jnp.exp(relative)), axis=-1)
        values = jnp.where(used, values, 0.0)
    tail = jnp.log(tail_mass) - log_total
    order = kept_order(ids, used, spec)
    if order is not None:
        ids = jnp.take_along_axis(ids, order, axis=-1)
        values = jnp.take_along_axis(values, order, axis=-1)
    out = encode_ids(ids, used, spec)
    if spec.value_dtype == "q8":
        out["values"], out["value_scale"] = quantize_logprobs(values)
        out["tail_logmass"] = tail.astype(jnp.bfloat16)
    elif spec.value_dtype == "q8sqrt":
        out["values"] = quantize_sqrt_logprobs(values)
        out["tail_logmass"] = tail.astype(jnp.bfloat16)
    else:
        out["values"] = values.astype(spec.value_dtype)
        out["tail_logmass"] = tail.astype(spec.value_dtype)
    if count is not None:
        out["id_count"] = count.astype(array_dtype(spec, "id_count"))
    return out


def kept_counts(logprobs: jax.Array, spec: TargetSpec) -> jax.Array:
    """``top_p``'s ids kept per token, ``[T]`` int32 in [min_k, k]: the fewest of the k largest
    log-probs ``[T, k]`` (descending) whose mass reaches top_p, each token on its own."""
    below_p = jnp.cumsum(jnp.exp(logprobs), axis=-1)[:, :-1] < spec.top_p
    return jnp.clip(1 + jnp.sum(below_p, axis=-1), spec.min_k, spec.k)


@functools.partial(jax.jit, static_argnames="spec")
def _cut_sequences(candidates: dict[str, jax.Array], counts: jax.Array,
                   spec: TargetSpec) -> dict[str, jax.Array]:
    return jax.vmap(lambda c, n: _cut_topk(c["cand_ids"], c["cand_relative"],
                                           c["cand_tail_mass"], c["cand_log_total"], n, spec))(
        candidates, counts)


def cut(candidates: dict[str, np.ndarray], counts: np.ndarray,
        spec: TargetSpec) -> dict[str, np.ndarray]:
    """A ``bytes_per_token`` spec's candidates ``{name: [S, L, ...]}`` (:func:`candidate_layout`)
    cut to ``counts`` ``[S, L]`` ids per token -> the stored arrays ``{name: [S, L, ...]}``
    (padded, as :func:`encode` gives other specs'). Runs on the host's CPU, the same program
    for the same S whatever device the teacher ran on."""
    with jax.default_device(jax.devices("cpu")[0]):
        out = _cut_sequences({name: jnp.asarray(a) for name, a in candidates.items()},
                             jnp.asarray(counts, jnp.int32), spec)
        return {name: np.asarray(a) for name, a in out.items()}


def array_dtype(spec: TargetSpec, name: str) -> str:
    """The stored dtype of array ``name`` (``array_layout(spec)``)."""
    return next(a.dtype for a in array_layout(spec) if a.name == name)


def _decode_topk(stored: dict[str, jax.Array], spec: TargetSpec) -> dict[str, jax.Array]:
    ids = decode_ids(stored, spec)
    tail = stored["tail_logmass"].astype(jnp.float32)
    if spec.value_dtype == "q8":
        values = dequantize_logprobs(stored["values"], stored["value_scale"])
    elif spec.value_dtype == "q8sqrt":
        values = dequantize_sqrt_logprobs(stored["values"])
    else:
        values = stored["values"].astype(jnp.float32)
    if spec.adaptive:
        used = jnp.arange(spec.k) < stored["id_count"].astype(jnp.int32)[:, None]
        ids, values = jnp.where(used, ids, -1), jnp.where(used, values, -jnp.inf)
    if spec.value_dtype != "float32":
        # rounding moved mass in or out of the top k: rescale the k values so that with the
        # stored tail they sum to 1 (the tail itself is the more precise figure)
        top_mass = jnp.log1p(-jnp.exp(tail))
        values = values + (top_mass - jax.nn.logsumexp(values, axis=-1))[:, None]
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": values,
            "teacher_tail_logmass": tail}


def _token_keys(sequence_indices: jax.Array, seq_len: int, seed: int, start=0) -> jax.Array:
    base = jax.random.key(seed)
    per_seq = jax.vmap(lambda s: jax.random.fold_in(base, s))(sequence_indices)
    positions = start + jnp.arange(seq_len)
    return jax.vmap(lambda k: jax.vmap(lambda p: jax.random.fold_in(k, p))(positions))(per_seq)


def _encode_sampled(logp: jax.Array, keys: jax.Array, spec: TargetSpec) -> dict[str, jax.Array]:
    n = spec.n_draws
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    cdf = jnp.cumsum(p, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys) * cdf[:, -1:]
    # side="right": the first id whose cdf exceeds u, so ids of probability 0 are never drawn
    draws = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u)
    draws = jnp.sort(jnp.minimum(draws, spec.tokenizer_vocab_size - 1), axis=-1)
    is_new = jnp.concatenate([jnp.ones_like(draws[:, :1], bool),
                              draws[:, 1:] != draws[:, :-1]], axis=-1)
    slot = jnp.cumsum(is_new, axis=-1) - 1
    ids = jax.vmap(lambda s, d: jnp.zeros(n, jnp.int32).at[s].max(d))(slot, draws)
    counts = jax.vmap(lambda s: jnp.zeros(n, jnp.int32).at[s].add(1))(slot)
    out = encode_ids(ids, counts > 0, spec)
    out["counts"] = counts.astype(jnp.uint8)
    out["entropy"] = entropy
    return out


def _decode_sampled(stored: dict[str, jax.Array], spec: TargetSpec) -> dict[str, jax.Array]:
    counts = stored["counts"].astype(jnp.float32)
    ids = jnp.where(counts > 0, decode_ids(stored, spec), 0)
    return {"teacher_sample_ids": ids, "teacher_sample_counts": counts,
            "teacher_entropy": stored["entropy"].astype(jnp.float32)}


def encode_positions(logits: jax.Array, sequence_index: jax.Array, spec: TargetSpec,
                     start=0) -> dict[str, jax.Array]:
    """Teacher logits [T, V] at positions ``start .. start + T - 1`` of sequence
    ``sequence_index`` -> stored arrays {name: [T, ...]}: a whole sequence (start 0, T = L), or
    a chunk of one (``pipeline.teacher_head``); each position's code depends on its own logits,
    sequence and position only."""
    if spec.mode == "full":
        real = jnp.arange(spec.vocab_size) < spec.tokenizer_vocab_size
        return {"logits": jnp.where(real, logits, PADDED_LOGIT).astype(spec.value_dtype)}
    x = scaled_logits(logits, spec)
    if spec.mode == "topk":
        return _encode_topk(x, spec)
    keys = _token_keys(sequence_index[None], logits.shape[0], spec.seed, start)[0]
    return _encode_sampled(jax.nn.log_softmax(x, axis=-1), keys, spec)


@functools.partial(jax.jit, static_argnames="spec")
def _encode_row(logits: jax.Array, sequence_indices: jax.Array, row: jax.Array,
                spec: TargetSpec) -> dict[str, jax.Array]:
    return encode_positions(jax.lax.dynamic_index_in_dim(logits, row, keepdims=False),
                            jax.lax.dynamic_index_in_dim(sequence_indices, row, keepdims=False),
                            spec)


def encode(logits: jax.Array, sequence_indices, spec: TargetSpec) -> dict[str, jax.Array]:
    """Teacher logits [B, L, V] of sequences ``sequence_indices`` [B] -> stored arrays
    {name: [B, L, *trailing]} (names and dtypes of :func:`encoded_layout`: a
    ``bytes_per_token`` spec's candidates).

    One compiled call per sequence (row ``b`` is sliced inside the call, dispatched
    asynchronously), so the float reductions over a sequence's [L, V] run in the same order
    whatever the batch: XLA may vectorise a [B * L, V] program differently for each B, which
    would make the stored bytes depend on the batching.
    """
    logits = jnp.asarray(logits)
    sequence_indices = jnp.asarray(sequence_indices, jnp.int32)
    # Both rows are sliced inside the call: an eager slice here costs a dispatch of its own.
    per_sequence = [_encode_row(logits, sequence_indices, np.int32(b), spec)
                    for b in range(logits.shape[0])]
    return {name: jnp.stack([p[name] for p in per_sequence]) for name in per_sequence[0]}


@functools.partial(jax.jit, static_argnames=("spec", "vocab_size"))
def decode(stored: dict[str, jax.Array], spec: TargetSpec,
           vocab_size: int | None = None) -> dict[str, jax.Array]:
    """Stored arrays {name: [B, L, *trailing]} -> the batch's teacher keys (``targets_from_batch``).

    vocab_size (full mode only): the run's logit width; padding columns are cut or added
    (with PADDED_LOGIT) to reach it. Ids of the other modes are real ids, valid for any width.
    """
    if spec.mode == "full":
        logits = stored["logits"]
        width = vocab_size or spec.vocab_size
        if width < spec.vocab_size:
            logits = logits[..., :width]
        elif width > spec.vocab_size:
            pad = [(0, 0)] * (logits.ndim - 1) + [(0, width - spec.vocab_size)]
            logits = jnp.pad(logits, pad, constant_values=PADDED_LOGIT)
        return {"teacher_logits": logits}
    batch, seq_len = next(iter(stored.values())).shape[:2]
    flat = {name: a.reshape(batch * seq_len, *a.shape[2:]) for name, a in stored.items()}
    out = _decode_topk(flat, spec) if spec.mode == "topk" else _decode_sampled(flat, spec)
    return {name: a.reshape(batch, seq_len, *a.shape[1:]) for name, a in out.items()}
