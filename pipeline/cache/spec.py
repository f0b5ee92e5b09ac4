"""What a cache stores per token: the :class:`TargetSpec` (mode, k, dtypes, adaptive top-k)
and the zarr3 arrays it is stored as (:func:`array_layout`). The cache's format, manifest and
compatibility rules are ``pipeline.cache.format``'s, which re-exports these names."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipeline.errors import CacheError

# Version 5: bytes_per_token shared over a shard (pipeline/cache/budget.py). Version 4: topk
# values default to q8sqrt (pipeline/cache/compress.py). Version 3: the gap code's ids as
# plain gaps (:func:`gap_dtype`), token-major and byte-shuffled; budgets on stored bytes.
# Version 2: adaptive top-k (ragged arrays). Version 1: fixed top-k / sampled / full. Arrays of
# versions 1 to 4 read unchanged (:func:`array_layout`; 5's are 4's).
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
MODES = ("topk", "sampled", "full")
VALUE_DTYPES = ("float32", "bfloat16", "q8", "q8sqrt")
# 8-bit codes of log-probs (topk only), and the first format version that has each
QUANTIZED_VALUES = {"q8": 1, "q8sqrt": 4}
ID_ENCODINGS = ("gap", "packed")
# Finite on purpose: softmax gives these ids probability exactly 0, and p * log p stays 0
# where -inf would make it nan in a dense loss.
PADDED_LOGIT = -1.0e9
# Widest id the bit unpacker reads from one 32-bit window (25 bits + a 7-bit byte offset).
MAX_ID_BITS = 25


def id_bits(vocab_size: int) -> int:
    """Bits of a packed id: ceil(log2(vocab_size)), at least 1."""
    return max(1, math.ceil(math.log2(vocab_size)))


def gap_dtype(vocab_size: int) -> str:
    """Integer type of a stored gap (format 3): uint16 while every gap (< vocab_size) fits in
    16 bits, else uint32, whose two high bytes, byte-shuffled, are nearly all zero runs."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What is stored per token; hashable, so it is a static argument of the jitted codecs.

    mode: "topk" | "sampled" | "full". k: ids per token (topk). n_draws: draws per token
    (sampled). value_dtype: topk values / full logits as "float32" | "bfloat16" | "q8" (8-bit
    log-probs with a per-token scale; topk only) | "q8sqrt" (8-bit levels uniform in sqrt(p),
    format 4; topk only); default q8sqrt (topk; q8 before format 4), float32 (full); None in
    sampled mode. id_encoding: "gap" (sorted ids, gaps; formats 1 and 2: gap
    lengths + extra bits) or "packed" (ceil(log2 V) bits each). temperature: T_cache (None in
    full mode). seed: key of the sampled draws, one stream per (sequence, position).
    Adaptive top-k (topk only; None otherwise): top_p keeps each token's most probable ids
    until their mass reaches top_p; bytes_per_token stores at most that many bytes per token
    on average (format 3 and later: stored bytes, measured; formats 1 and 2: raw bytes before
    compression, :func:`raw_token_bytes`) on the most probable ids of each shard (format 5)
    or sequence (before; pipeline/cache/budget.py); either way between min_k and k ids per
    token.
    format_version: the cache format whose arrays these are (manifest.json keeps it beside
    the target, not in it: :class:`pipeline.cache.format.CacheManifest`).
    """

    mode: str
    vocab_size: int
    tokenizer_vocab_size: int
    k: int | None = None
    n_draws: int | None = None
    value_dtype: str | None = None
    id_encoding: str = "gap"
    temperature: float | None = 1.0
    seed: int = 0
    top_p: float | None = None
    min_k: int | None = None
    bytes_per_token: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        def bad(field, expected, seen):
            raise CacheError(f"cache target spec: {field} expected {expected}, got {seen!r}")

        if self.format_version not in READABLE_VERSIONS:
            bad("format_version", f"one of {READABLE_VERSIONS}", self.format_version)
        if self.mode not in MODES:
            bad("mode", f"one of {MODES}", self.mode)
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 2):
            bad("vocab_size", "an int >= 2", self.vocab_size)
        if id_bits(self.vocab_size) > MAX_ID_BITS:
            bad("vocab_size", f"<= 2**{MAX_ID_BITS}", self.vocab_size)
        if not (isinstance(self.tokenizer_vocab_size, int)
                and 2 <= self.tokenizer_vocab_size <= self.vocab_size):
            bad("tokenizer_vocab_size", f"an int in [2, vocab_size={self.vocab_size}]",
                self.tokenizer_vocab_size)
        if self.mode == "sampled":
            # sampled mode stores counts, not values (entropy is always f32)
            if self.value_dtype is not None:
                bad("value_dtype", "None in sampled mode", self.value_dtype)
        elif self.value_dtype is None:
            object.__setattr__(self, "value_dtype", "float32" if self.mode != "topk" else
                               "q8sqrt" if self.format_version >= 4 else "q8")
        elif self.value_dtype not in VALUE_DTYPES:
            bad("value_dtype", f"one of {VALUE_DTYPES}", self.value_dtype)
        elif QUANTIZED_VALUES.get(self.value_dtype, 1) > self.format_version:
            known = tuple(v for v in VALUE_DTYPES
                          if QUANTIZED_VALUES.get(v, 1) <= self.format_version)
            bad("value_dtype", f"one of format version {self.format_version}'s {known}",
                self.value_dtype)
        if self.id_encoding not in ID_ENCODINGS:
            bad("id_encoding", f"one of {ID_ENCODINGS}", self.id_encoding)
        if self.mode == "topk":
            if not (isinstance(self.k, int) and 1 <= self.k <= self.tokenizer_vocab_size):
                bad("k", f"an int in [1, tokenizer_vocab_size={self.tokenizer_vocab_size}]",
                    self.k)
        elif self.k is not None:
            bad("k", f"None in {self.mode} mode", self.k)
        if self.mode == "sampled":
            if not (isinstance(self.n_draws, int) and 1 <= self.n_draws <= 255):
                bad("n_draws", "an int in [1, 255]", self.n_draws)
        elif self.n_draws is not None:
            bad("n_draws", f"None in {self.mode} mode", self.n_draws)
        if self.mode == "full":
            if self.temperature is not None:
                bad("temperature", "None in full mode (logits serve any temperature)",
                    self.temperature)
            if self.value_dtype in QUANTIZED_VALUES:
                bad("value_dtype", "float32 or bfloat16 in full mode", self.value_dtype)
        elif not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            bad("temperature", "a number > 0", self.temperature)
        self._check_adaptive(bad)

    def _check_adaptive(self, bad) -> None:
        if self.mode != "topk" or not self.adaptive:
            for field in ("top_p", "min_k", "bytes_per_token"):
                if getattr(self, field) is not None:
                    bad(field, "None unless mode is topk with top_p or bytes_per_token",
                        getattr(self, field))
            return
        if self.top_p is not None and self.bytes_per_token is not None:
            bad("top_p", "None when bytes_per_token is set (one rule picks the ids)", self.top_p)
        if self.top_p is not None and not (isinstance(self.top_p, (int, float))
                                           and 0 < self.top_p <= 1):
            bad("top_p", "a number in (0, 1]", self.top_p)
        if not (isinstance(self.min_k, int) and 1 <= self.min_k <= self.k):
            bad("min_k", f"an int in [1, k={self.k}]", self.min_k)
        if self.bytes_per_token is not None:
            per_token, per_id = raw_token_bytes(self)
            least = per_token + self.min_k * per_id
            if not (isinstance(self.bytes_per_token, (int, float))
                    and self.bytes_per_token >= least):
                bad("bytes_per_token", f"a number >= {least:g} (cache.bytes_per_token: the raw "
                    f"bytes of min_k={self.min_k} ids and a token's own fields)",
                    self.bytes_per_token)

    @property
    def adaptive(self) -> bool:
        """Whether the number of ids varies per token (top_p or bytes_per_token)."""
        return self.top_p is not None or self.bytes_per_token is not None

    @property
    def stored_budget(self) -> bool:
        """Whether bytes_per_token bounds stored bytes (format >= 3) rather than raw ones."""
        return self.bytes_per_token is not None and self.format_version >= 3

    @property
    def cut_on_host(self) -> bool:
        """Whether the encoder gives the k candidates of every token (``bytes_per_token``:
        ``compress.candidate_layout``), which ``pipeline.cache.budget.cut`` turns into the
        stored arrays on the host, and audits there."""
        return self.bytes_per_token is not None

    @property
    def shard_budget(self) -> bool:
        """Whether a cache shares bytes_per_token over each shard (format >= 5) rather than
        each sequence."""
        return self.bytes_per_token is not None and self.format_version >= 5

    @property
    def gap_ids(self) -> bool:
        """Whether ids are stored as plain gaps (:func:`gap_dtype`; gap code of format 3)."""
        return self.id_encoding == "gap" and self.format_version >= 3

    @property
    def slots(self) -> int:
        """Ids stored per token: k (topk), n_draws (sampled)."""
        return self.k if self.mode == "topk" else self.n_draws

    @property
    def stored(self) -> str:
        """What is stored per token, in words (``kdpipe inspect``)."""
        kept = (f"{self.min_k}..{self.k} ids per token to mass {self.top_p}"
                 if self.top_p is not None else
                 f"{self.min_k}..{self.k} ids per token (<= {self.bytes_per_token:g} "
                 f"{'stored' if self.stored_budget else 'raw'} B/token over each "
                 f"{'shard' if self.shard_budget else 'sequence'})"
                 if self.adaptive else f"top-{self.k}")
        return {"topk": f"{kept} log-probs + tail mass",
                "sampled": f"{self.n_draws} sampled draws (ids + counts) + teacher entropy",
                "full": "full logits"}[self.mode]

    @property
    def kl_meaning(self) -> str:
        """What a KL to these targets is (pipeline.losses.token_losses), in words."""
        return {"topk": "the KL over the k+1 buckets of the top-k targets (the k cached ids and "
                        "the tail mass), not over the vocabulary",
                "sampled": "the sampled estimate of the forward KL (unbiased; one draw's can be "
                           "negative)",
                "full": "the KL over the whole vocabulary"}[self.mode]


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
    """One stored zarr3 array: dtype and the shape after [num_sequences, seq_len]."""

    name: str
    dtype: str
    trailing: tuple[int, ...]
    # "zstd"; "zstd_transposed" (slot-major bytes: per-slot arrays, id bits); "blosc_shuffle"
    # (token-major, bytes shuffled by significance: format 3's gaps)
    codec: str
    # Adaptive top-k's per-slot arrays: stored as [num_sequences, seq_len * trailing[0]], each
    # sequence's used slots packed at the front (pipeline/cache/ragged.py), token-major for a
    # token-major codec, else slot-major.
    ragged: bool = False

    @property
    def token_major(self) -> bool:
        """Whether a token's slots are stored together (else each slot's entries are)."""
        return self.codec == "blosc_shuffle"

    def stored_trailing(self, seq_len: int) -> tuple[int, ...]:
        """The on-disk shape after [num_sequences] (ragged: one entry axis)."""
        return (seq_len * self.trailing[0],) if self.ragged else (seq_len, *self.trailing)


def mantissa_bytes(spec: TargetSpec) -> int:
    """Capacity of one token's bit-packed id row: every id at its widest possible code."""
    bits = id_bits(spec.vocab_size)
    per_id = bits - 1 if spec.id_encoding == "gap" else bits
    return max(1, math.ceil(spec.slots * per_id / 8))


def array_layout(spec: TargetSpec) -> tuple[ArrayLayout, ...]:
    """The arrays a spec stores; the only place the on-disk names and dtypes are defined."""
    if spec.mode == "full":
        return (ArrayLayout("logits", spec.value_dtype, (spec.vocab_size,), "zstd"),)
    m = spec.slots
    # neighbouring tokens share much of their id sets: token-major gaps repeat byte patterns
    ids = [ArrayLayout("id_gaps", gap_dtype(spec.vocab_size), (m,), "blosc_shuffle")]
    if not spec.gap_ids:
        ids = [ArrayLayout("id_stream", "uint8", (mantissa_bytes(spec),), "zstd_transposed")]
    if spec.id_encoding == "gap" and not spec.gap_ids:
        ids.insert(0, ArrayLayout("id_gap_lengths", "uint8", (m,), "zstd_transposed"))
    if spec.mode == "sampled":
        return (*ids, ArrayLayout("counts", "uint8", (m,), "zstd_transposed"),
                ArrayLayout("entropy", "float32", (), "zstd"))
    if spec.value_dtype in QUANTIZED_VALUES:
        values = [ArrayLayout("values", "uint8", (m,), "zstd_transposed")]
        if spec.value_dtype == "q8":
            values.append(ArrayLayout("value_scale", "bfloat16", (), "zstd"))
        tail_dtype = "bfloat16"
    else:
        values = [ArrayLayout("values", spec.value_dtype, (m,), "zstd_transposed")]
        tail_dtype = spec.value_dtype
    arrays = (*ids, *values, ArrayLayout("tail_logmass", tail_dtype, (), "zstd"))
    if not spec.adaptive:
        return arrays
    # ragged slot arrays are packed in their order already: no transpose
    count = ArrayLayout("id_count", "uint8" if spec.k <= 255 else "uint16", (), "zstd")
    return (count, *(dataclasses.replace(a, ragged=True, codec="zstd" if a.codec ==
                                         "zstd_transposed" else a.codec)
                     if a.trailing else a for a in arrays))


def raw_token_bytes(spec: TargetSpec) -> tuple[float, float]:
    """Raw (before zstd) bytes of an adaptive top-k token: (per token, per kept id). An id's
    gap code is counted at its widest (``id_bits - 1`` bits; packed: ``id_bits``), so a mean
    of these over a sequence bounds its raw size; zstd stores less."""
    per_token = per_id = 0.0
    bits = id_bits(spec.vocab_size) - (spec.id_encoding == "gap")
    for a in array_layout(spec):
        size = np.dtype(a.dtype).itemsize if a.dtype != "bfloat16" else 2
        if a.name == "id_stream":
            per_id += bits / 8
        elif a.trailing:
            per_id += size
        else:
            per_token += size
    return per_token, per_id
