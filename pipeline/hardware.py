"""Peak FLOP/s of the accelerators kdpipe targets, model FLOPs per token, and MFU.

MFU (model FLOPs utilisation; Chowdhery et al. 2022, "PaLM", appendix B) is the share of the
chips' peak that the model's own arithmetic uses::

    MFU = model FLOPs per token * tokens per second / (peak FLOP/s per chip * chips)

Model FLOPs per token are counted by formula, not by XLA (``train_flops_per_token``): the
matmuls of a forward pass, ``2 N``, plus attention's scores and weighted values,
``4 L H Q T``, times 3 for forward and backward, ``6 N + 12 L H Q T`` (PaLM appendix B;
Kaplan et al. 2020, "Scaling Laws for Neural Language Models", table 1, has the same with the
causal half only). Rematerialisation's recomputation is hardware work, not model work, and
is left out by definition (``recompute_flops_per_token`` gives it separately). XLA's
``cost_analysis()`` of the compiled step is no substitute: it counts a while loop's body once
whatever its trip count, and the step always holds one (gradient accumulation's scan, even of
one microbatch; also scanned layers, blockwise attention's blocks, the fused head's chunks),
and it counts the recomputation and the optimizer too.

A chip missing from ``CHIPS`` (a CPU, an unlisted accelerator) has no peak: its MFU is
``None``, shown as "n/a", never a guess.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: its name and dense bfloat16 peak, FLOP/s per chip."""

    name: str
    peak_flops: float


# Dense (no sparsity) bfloat16 peaks per chip, vendor figures: Google Cloud's TPU pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: 275, 197, 459, 918 TFLOP/s); NVIDIA's
# datasheets (A100 Tensor Core GPU: 312 TFLOP/s; H100 and H200 Tensor Core GPU: their "with
# sparsity" bf16 figures halved: H100 SXM and H200 SXM 989, H100 PCIe 756, H200 NVL 835).
# Keys are full matches of ``jax.Device.device_kind``: TPU kinds as JAX spells them (its Pallas
# TPU tests: "TPU v5 lite" is v5e, "TPU v5" v5p, "TPU v6 lite" v6e); GPU kinds are the CUDA
# device names ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200"). First match
# wins.
CHIPS: tuple[tuple[re.Pattern, Chip], ...] = tuple((re.compile(pattern), Chip(name, peak))
                                                   for pattern, name, peak in (
    (r"TPU v4", "TPU v4", 275e12),
    (r"TPU v5 ?(lite|e)", "TPU v5e", 197e12),
    (r"TPU v5p?", "TPU v5p", 459e12),
    (r"TPU v6 ?(lite|e)", "TPU v6e", 918e12),
    (r"NVIDIA A100\b.*", "A100", 312e12),
    (r"NVIDIA H100\b.*PCIe.*", "H100 PCIe", 756e12),
    (r"NVIDIA H100\b.*", "H100 SXM", 989e12),
    (r"NVIDIA H200 NVL.*", "H200 NVL", 835e12),
    (r"NVIDIA H200\b.*", "H200 SXM", 989e12),
))


def chip_of(device_kind: str) -> Chip | None:
    """The ``CHIPS`` entry of a ``jax.Device.device_kind``; ``None`` when it has none (a CPU,
    an unlisted accelerator)."""
    for pattern, chip in CHIPS:
        if pattern.fullmatch(device_kind):
            return chip
    return None


def matmul_params(config) -> int:
    """The weights a token is multiplied by, ``N``: each layer's q, k, v and output
    projections and the three of its SwiGLU MLP, and the output head (counted even when tied
    to the embedding table; the embedding lookup itself is no matmul). Norm scales and
    biases, a few vectors, are left out.

    Args:
      config: a model family's config (``pipeline.models.llama.LlamaConfig``): its
        ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim``.
    """
    d, q = config.hidden_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    per_layer = d * q * (2 * heads + 2 * kv_heads) + 3 * d * config.intermediate_size
    return config.num_hidden_layers * per_layer + config.vocab_size * d


def attention_flops_per_token(config, seq_len: int) -> float:
    """A forward pass's attention matmuls per token, ``4 L H Q T``: scores ``q k^T`` and the
    weighted values, ``2 H Q T`` each per layer over the whole ``T x T`` square (PaLM's
    count: what a dense kernel computes, the causal mask's zeros included)."""
    return 4.0 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len


def forward_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per token of a forward pass at ``seq_len`` tokens a row:
    ``2 N + 4 L H Q T`` (``matmul_params``, ``attention_flops_per_token``)."""
    return 2.0 * matmul_params(config) + attention_flops_per_token(config, seq_len)


def train_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per token of a training step (forward and backward):
    ``6 N + 12 L H Q T``, three forward passes' worth (PaLM appendix B)."""
    return 3.0 * forward_flops_per_token(config, seq_len)


def recompute_flops_per_token(config, seq_len: int, remat: str) -> float:
    """Matmul FLOPs per token that rematerialisation (``model.<role>.remat``,
    ``pipeline.models.stack``) adds in the backward pass: ``full`` runs each layer's forward
    again but for its last matmul, the MLP's down projection, whose output the backward pass
    does not use (``2 (N - V d - L d F) + 4 L H Q T``; the head is outside the layers);
    ``save_dots`` and ``offload`` keep the matmuls against weights and recompute attention's
    two batched matmuls (``4 L H Q T``); ``none`` recomputes nothing."""
    attention = attention_flops_per_token(config, seq_len)
    if remat == "full":
        layers = (matmul_params(config) - config.vocab_size * config.hidden_size
                  - config.num_hidden_layers * config.hidden_size * config.intermediate_size)
        return 2.0 * layers + attention
    if remat in ("save_dots", "offload"):
        return attention
    return 0.0


def mfu(flops_per_token: float, tokens_per_s: float, chip: Chip | None,
        chips: int) -> float | None:
    """Model FLOPs utilisation, a fraction: ``flops_per_token * tokens_per_s / (chip's peak *
    chips)``; ``None`` when the chip has no known peak."""
    if chip is None:
        return None
    return flops_per_token * tokens_per_s / (chip.peak_flops * chips)


def format_mfu(value: float | None) -> str:
    """``"41.3%"``, or ``"n/a"`` where no peak is known."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


@dataclasses.dataclass(frozen=True)
class Utilisation:
    """How a run's MFU is measured: its step's model FLOPs per token
    (``train_flops_per_token``) and the chips the step runs on.

    Attributes:
      flops_per_token: model FLOPs per token of the step.
      device_kind: ``jax.Device.device_kind`` of the chips.
      chips: how many run the step (``jax.device_count()``).
    """

    flops_per_token: float
    device_kind: str
    chips: int

    @property
    def chip(self) -> Chip | None:
        return chip_of(self.device_kind)

    def mfu(self, tokens_per_s: float) -> float | None:
        """MFU at ``tokens_per_s`` (the whole step's tokens a second); ``None`` without a
        known peak."""
        return mfu(self.flops_per_token, tokens_per_s, self.chip, self.chips)

    def describe(self) -> str:
        """One line saying what MFU is computed from, or why it is n/a."""
        if self.chip is None:
            return (f"MFU: n/a, no peak FLOP/s is known for device kind {self.device_kind!r} "
                    f"(pipeline/hardware.py CHIPS)")
        return (f"MFU: {self.flops_per_token:.4g} model FLOPs per token (6N + 12LHQT, PaLM "
                f"appendix B; pipeline/hardware.py) x tokens/s / ({self.chips} x "
                f"{self.chip.name} at {self.chip.peak_flops / 1e12:.0f} TFLOP/s bf16)")
