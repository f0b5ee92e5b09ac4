"""Trace-time checks of a distillation loss's inputs: settings, shapes, targets.

Each raises a ``ConfigError`` (a setting) or ``KdpipeError`` (an array) naming the field and
what was expected. Settings that select code (``divergence``, ``beta``, ``valid_vocab_size``)
must be Python values; ``temperature`` and ``alpha`` may be traced, then they are not
range-checked.
"""

from __future__ import annotations

import jax

from pipeline.errors import ConfigError, KdpipeError
from pipeline.losses.divergences import DEFINITIONS, DIVERGENCES
from pipeline.losses.targets import DenseTargets, SampledTargets, Targets


def check_loss_inputs(student_logits, targets: Targets, attention_mask, labels, use_hard_labels,
                      temperature, alpha, divergence, beta, *, valid_vocab_size=None) -> None:
    """All trace-time checks of a distillation loss call; raises ``KdpipeError``/``ConfigError``."""
    _check_settings(temperature, alpha, divergence, beta)
    _check_valid_vocab_size(valid_vocab_size)
    if isinstance(targets, SampledTargets) and DEFINITIONS[divergence].from_samples is None:
        estimated = " or ".join(repr(name) for name, d in DEFINITIONS.items() if d.from_samples)
        raise ConfigError(f"divergence: sampled teacher targets support only {estimated} "
                          f"(their estimator is unbiased for it alone), got {divergence!r}")
    check_targets(student_logits, targets)
    _check_labels(use_hard_labels, labels)
    tokens = tuple(student_logits.shape[:-1])
    check_token_shape("attention_mask", attention_mask, tokens)
    check_token_shape("labels", labels, tokens)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_settings(temperature, alpha, divergence, beta) -> None:
    if _is_concrete(temperature) and not float(temperature) > 0:
        raise ConfigError(f"temperature: expected > 0, got {temperature}")
    if _is_concrete(alpha) and not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha: expected in [0, 1], got {alpha}")
    if divergence not in DIVERGENCES:
        raise ConfigError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ConfigError(f"beta: expected in [0, 1], got {beta}")


def check_token_shape(name: str, array, token_shape: tuple[int, ...]) -> None:
    """Checks that ``array`` (if given) has the logits' token shape, e.g. ``[batch, seq]``."""
    if array is not None and tuple(array.shape) != token_shape:
        raise KdpipeError(f"{name}: expected shape {token_shape} (the logits' token shape), "
                          f"got {tuple(array.shape)}")


def _check_valid_vocab_size(valid_vocab_size) -> None:
    # A Python int: it selects code (which columns are padding) at trace time.
    if valid_vocab_size is not None and (isinstance(valid_vocab_size, bool)
                                         or not isinstance(valid_vocab_size, int)
                                         or valid_vocab_size < 1):
        raise ConfigError(f"valid_vocab_size: expected None or an int >= 1 (the tokenizer's "
                          f"vocabulary size), got {valid_vocab_size!r}")


def _check_labels(use_hard_labels: bool, labels) -> None:
    if use_hard_labels and labels is None:
        raise KdpipeError("labels: use_hard_labels=True needs labels, got labels=None")


def check_targets(student_logits: jax.Array, targets: Targets) -> None:
    """Checks that ``targets`` fit ``student_logits`` ``[..., vocab]`` (shapes only)."""
    tokens, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if isinstance(targets, DenseTargets):
        if targets.logits.shape != student_logits.shape:
            raise KdpipeError(
                f"teacher_logits: expected the student logits' shape {tuple(student_logits.shape)}"
                f" (tokens {tokens}, vocab {vocab}), got {tuple(targets.logits.shape)}")
        return
    ids, values, per_token = targets
    for name, array in (("ids", ids), ("values", values)):
        if tuple(array.shape[:-1]) != tokens:
            raise KdpipeError(f"{type(targets).__name__}.{name}: expected leading shape {tokens}"
                              f" (the student logits' tokens), got {tuple(array.shape)}")
    if ids.shape != values.shape:
        raise KdpipeError(f"{type(targets).__name__}: ids {tuple(ids.shape)} and values "
                          f"{tuple(values.shape)} must have the same shape")
    if ids.shape[-1] > vocab:
        raise KdpipeError(f"{type(targets).__name__}.ids: {ids.shape[-1]} ids per token exceed "
                          f"the student vocab {vocab}")
    check_token_shape(f"{type(targets).__name__}.{targets._fields[2]}", per_token, tokens)
