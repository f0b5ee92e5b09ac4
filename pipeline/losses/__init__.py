"""Distillation losses: pure functions of arrays, with their math in the docstrings.

The semantics follow EasyDeL 0.3's ``distillation_loss`` (names, parameters, defaults, the
T²-scaled forward KL, the token mean over ``attention_mask × (labels != -100)``, CE at
temperature 1, α mixing), with these differences in *how*, never in *what* (and one opt-in
extension, the last):

- the KL is computed directly as ``Σ p_t (log p_t − log p_s)``, never as a difference of two
  large cross-entropies (that difference goes negative in bf16, EasyDeL issue #267);
- all math runs in float32 whatever the input dtype, but the upcast is elementwise inside the
  reductions, so XLA fuses it and a bf16 ``[tokens, vocab]`` input is never copied whole;
- besides the forward KL there are the reverse KL and the generalized Jensen-Shannon
  divergence of GKD (Agarwal et al., 2024), and sparse teacher targets (``TopKTargets``,
  ``SampledTargets``) read from the teacher-output cache; the student's top-k tail mass is
  summed over the tail ids, never as ``1 − Σ_top-k q`` (which cancels in float32 once the
  student is sure of its top ids), and its backward pass is written to avoid cancellation;
- ``valid_vocab_size`` (``None`` = EasyDeL's semantics) marks the ids of a
  padded head (Qwen-family models) from the tokenizer's vocabulary size on as padding
  (:func:`restrict_to_vocab`): the divergences are taken between the distributions over the
  real ids only; the hard-label CE stays over the full logits.

Shapes: ``[..., vocab]`` logits with any leading token shape (usually ``[batch, seq]``);
per-token functions return the leading shape. Every function is traceable under ``jax.jit``;
the scalar settings (``temperature``, ``alpha``, ``divergence``, ``beta``,
``valid_vocab_size``, layer indices) are checked at trace time and must be Python values when
they select code (``divergence``, ``beta``, ``valid_vocab_size``, layers). ``temperature`` and
``alpha`` may be traced, then they are not range-checked.

The modules, each one idea:

- ``divergences``: the table of divergences (value and closed-form gradient), by name;
- ``softmax``: the float32 softmax pieces over a padded head's real ids;
- ``dense``: the divergence against full teacher logits and its backward pass;
- ``sparse``: the student's log-probabilities at a few ids and the tail (top-k, sampled, CE);
- ``targets``: the teacher targets' containers; ``checks``: the trace-time checks;
- ``token_losses``: the per-token terms for each kind of targets; ``reduce``: mask and mean;
- ``distill``: ``distillation_loss`` and ``targets_distillation_loss``;
- ``fused_head``: output head and loss fused, chunk by chunk over tokens;
- ``intermediate``: hidden-state and attention-map losses.
"""

from pipeline.losses.checks import check_loss_inputs, check_targets
from pipeline.losses.distill import (combine_token_losses, distillation_loss,
                                     targets_distillation_loss)
from pipeline.losses.divergences import DIVERGENCES, token_divergence
from pipeline.losses.fused_head import fused_head_distillation_loss
from pipeline.losses.intermediate import attention_loss, hidden_state_loss
from pipeline.losses.reduce import IGNORE_INDEX, loss_mask, masked_token_mean
from pipeline.losses.softmax import restrict_to_vocab, token_entropy
from pipeline.losses.sparse import token_cross_entropy, topk_bucket_logprobs
from pipeline.losses.targets import (DenseTargets, SampledTargets, Targets, TopKTargets,
                                     targets_from_batch)
from pipeline.losses.token_losses import TokenLosses, token_losses

__all__ = [
    "DIVERGENCES", "IGNORE_INDEX", "DenseTargets", "SampledTargets", "Targets", "TokenLosses",
    "TopKTargets", "attention_loss", "check_loss_inputs", "check_targets",
    "combine_token_losses", "distillation_loss", "fused_head_distillation_loss",
    "hidden_state_loss", "loss_mask", "masked_token_mean", "restrict_to_vocab",
    "targets_distillation_loss", "targets_from_batch", "token_cross_entropy",
    "token_divergence", "token_entropy", "token_losses", "topk_bucket_logprobs",
]
