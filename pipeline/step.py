"""The jitted distillation step: one optimizer update of a student on a teacher's targets.

``distillation_step`` keeps the name, parameters and defaults of EasyDeL's
``distillation_trainer._fn.distillation_step`` (erfanzar/EasyDeL on GitHub), with
``logits_chunk_size`` as in EasyDeL 0.3. The teacher either runs live inside the step (under
``stop_gradient``) or its outputs arrive in the batch from the cache, so the same step serves
both. ``jit_distillation_step`` is its compiled form (configuration static, student state
donated when training).

Objective, with the KD term given by ``pipeline.losses.distillation_loss``::

    loss = kd + hidden_state_weight * hidden + attention_weight * attention
    kd   = alpha * kl_loss + (1 - alpha) * ce_loss    (ce only with use_hard_labels)

Each term is a masked mean over the whole batch. Gradient accumulation splits the batch into
microbatches and weights each microbatch's term by its share of the term's denominator: tokens
``m = attention_mask * (labels != -100)`` for the KD/CE terms, ``sum(attention_mask)`` for
hidden states, query-key pairs for attentions. Summed over microbatches this is exactly the
full-batch mean and gradient, whatever the padding of each microbatch. (Averaging the
microbatch means, as EasyDeL does, over-weights microbatches with few tokens.)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from pipeline import losses
from pipeline.config import hard_labels_only
from pipeline.errors import ConfigError, DataError, KdpipeError
from pipeline.losses import fused_head_distillation_loss


@dataclasses.dataclass(frozen=True, slots=True)
class DistillLossConfig:
    """How the KD term is formed: the seed's ``loss_config`` slot (not EasyDeL's LossConfig).

    Attributes:
      divergence: ``"forward_kl"`` (the seed's), ``"reverse_kl"`` or ``"jsd"`` (generalized JSD),
        as defined in ``pipeline.losses``.
      beta: the generalized JSD's mixing weight (0.5 = symmetric); unused by the KLs.
      use_hard_labels: add ``(1 - alpha) * ce_loss`` on ``batch["labels"]`` (which must exist).
      valid_vocab_size: the tokenizer's vocabulary size when the models' heads are padded past
        it (Qwen-family checkpoints): ids from it on are padding, and the divergence is taken
        between the teacher's and the student's distributions over the real ids only
        (``pipeline.losses.restrict_to_vocab``), whichever teacher source gives the targets.
        ``None``, or a size at least the logits' width, restricts nothing.
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    use_hard_labels: bool = False
    valid_vocab_size: int | None = None


class TrainState(struct.PyTreeNode):
    """A flax.nnx model split for ``jax.jit``, with its optimizer state.

    Attributes:
      graphdef: the model's structure (static: part of the pytree definition, not a leaf).
      params: the ``nnx.Param`` variables, the only ones differentiated and updated.
      other: every other variable (RNG streams, running statistics), carried through the step.
      opt_state: ``tx``'s state, or ``None`` for a frozen model such as a live teacher.
      step: int32 scalar, the number of applied updates. A skipped update (non-finite, or a
        batch without loss tokens) does not count, so the learning-rate schedule, like the
        optimizer's own state, stays where it was.
      tx: the optax transformation (static), or ``None`` for a frozen model.
    """

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    params: nnx.State
    other: nnx.State
    opt_state: optax.OptState | None
    step: jax.Array
    tx: optax.GradientTransformation | None = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module,
               tx: optax.GradientTransformation | None = None) -> "TrainState":
        """Splits ``model``; ``tx=None`` gives a frozen state (a teacher) with no optimizer."""
        graphdef, params, other = nnx.split(model, nnx.Param, ...)
        return cls(graphdef=graphdef, params=params, other=other,
                   opt_state=None if tx is None else tx.init(params),
                   step=jnp.zeros((), jnp.int32), tx=tx)

    def model(self) -> nnx.Module:
        """A fresh ``nnx.Module`` holding copies of this state's variables.

        Copies, so that the module may update its variables (an RNG stream's counter) inside
        any trace, and so that doing so never changes this state.
        """
        return nnx.merge(self.graphdef, self.params, self.other, copy=True)


@struct.dataclass
class LossMetrics:
    """What one step reports; all scalars. ``None`` marks a term that was not computed.

    Attributes:
      loss: the objective that was differentiated (module docstring).
      kl_loss: ``T² ·`` mean divergence (the chosen ``divergence``).
      ce_loss: mean cross-entropy on labels (in the loss only with ``use_hard_labels``);
        ``None`` when the batch has no labels.
      hidden_state_loss: unweighted hidden-state term; ``None`` when its weight is 0.
      attention_loss: unweighted attention term; ``None`` when its weight is 0.
      teacher_entropy: mean entropy of the teacher distribution at temperature T.
      top1_agreement: fraction of loss tokens where student and teacher argmax agree.
      num_tokens: int32, loss tokens ``sum(m)`` in the whole batch.
      learning_rate: ``learning_rate_fn(step)`` before the update; ``None`` without it.
      grad_norm: global norm of the accumulated gradient; ``None`` in evaluation.
      skipped_updates: int32, 1 if a non-finite loss or gradient skipped this update, else 0
        (sum it over steps for a count); ``None`` in evaluation.
      empty_batches: int32, 1 if this update was skipped because no term of the objective had
        a token (``num_tokens`` 0 and, for the hidden-state and attention terms that are on,
        no attended token), else 0; ``None`` in evaluation. Such a batch has no gradient, yet
        applying it would still move the parameters (momentum, weight decay) and advance the
        schedule. It is counted here and not in ``skipped_updates``, whatever its loss.
    """

    loss: jax.Array
    num_tokens: jax.Array
    kl_loss: jax.Array | None = None
    teacher_entropy: jax.Array | None = None
    top1_agreement: jax.Array | None = None
    ce_loss: jax.Array | None = None
    hidden_state_loss: jax.Array | None = None
    attention_loss: jax.Array | None = None
    learning_rate: jax.Array | None = None
    grad_norm: jax.Array | None = None
    skipped_updates: jax.Array | None = None
    empty_batches: jax.Array | None = None

    def as_dict(self) -> dict[str, jax.Array]:
        """The computed metrics by name (``None`` fields left out), e.g. for a metrics logger."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


# The KD term's metrics, all means over the KD mask (so weighted like the KD term).
_KD_METRICS = ("kl_loss", "ce_loss", "teacher_entropy", "top1_agreement")


def _check_arguments(student_state, batch, teacher_state, loss_config, partition_spec,
                     gradient_accumulation_steps, is_training, alpha, hidden_state_weight,
                     attention_weight, logits_chunk_size):
    """Refuses bad step arguments before anything is traced (each error names the argument).

    The loss settings (temperature, alpha, divergence, beta, labels for use_hard_labels, layer
    indices, widths) are checked by ``pipeline.losses`` when the step is traced.
    """
    if is_training and student_state.tx is None:
        raise ConfigError("student_state: training needs an optimizer, got a state made with "
                          "tx=None (TrainState.create(model, tx)); or pass is_training=False")
    if not isinstance(loss_config, DistillLossConfig):
        raise ConfigError("loss_config: expected a DistillLossConfig or None, got "
                          f"{type(loss_config).__name__}")
    valid = loss_config.valid_vocab_size
    if valid is not None and not (isinstance(valid, int) and valid >= 1):
        raise ConfigError(f"loss_config.valid_vocab_size: expected None or an int >= 1, "
                          f"got {valid!r}")
    steps = gradient_accumulation_steps
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"gradient_accumulation_steps: expected an int >= 1, got {steps!r}")
    for name, weight in (("hidden_state_weight", hidden_state_weight),
                         ("attention_weight", attention_weight)):
        if not weight >= 0:
            raise ConfigError(f"{name}: expected >= 0, got {weight}")
        if weight > 0 and teacher_state is None:
            raise ConfigError(f"{name}={weight} needs a live teacher (teacher_state), "
                              "got teacher_state=None")
    chunk = logits_chunk_size
    if chunk is not None and not (isinstance(chunk, int) and chunk >= 1):
        raise ConfigError(f"logits_chunk_size: expected None or an int >= 1, got {chunk!r}")
    if partition_spec is not None and not isinstance(partition_spec, (PartitionSpec, NamedSharding)):
        raise ConfigError("partition_spec: expected None, a PartitionSpec or a NamedSharding, "
                          f"got {type(partition_spec).__name__}")

    if "input_ids" not in batch or jnp.ndim(batch["input_ids"]) != 2:
        seen = f"shape {jnp.shape(batch['input_ids'])}" if "input_ids" in batch else "no such key"
        raise DataError(f"batch['input_ids']: expected an int array [batch, seq], got {seen}")
    shape = jnp.shape(batch["input_ids"])
    for key in ("attention_mask", "labels", "segment_ids"):
        if key in batch and jnp.shape(batch[key]) != shape:
            raise DataError(f"batch[{key!r}]: expected shape {shape} like input_ids, "
                            f"got {jnp.shape(batch[key])}")
    for key, value in batch.items():
        if jnp.shape(value)[:1] != shape[:1]:
            raise DataError(f"batch[{key!r}]: expected leading (batch) size {shape[0]}, "
                            f"got shape {jnp.shape(value)}")
    if shape[0] % steps:
        raise ConfigError(f"gradient_accumulation_steps ({steps}) must divide the batch size "
                          f"({shape[0]})")

    cached = sorted(key for key in batch if key.startswith("teacher_"))
    if teacher_state is not None and cached:
        raise ConfigError(f"teacher_state is given and the batch also holds teacher outputs "
                          f"{cached}: give one teacher, live or cached")
    needs_teacher = not hard_labels_only(alpha, loss_config.use_hard_labels)
    if teacher_state is None and (cached or needs_teacher):
        try:
            losses.targets_from_batch(batch)
        except KdpipeError as error:
            raise ConfigError(
                f"teacher_state=None needs teacher targets in the batch (or alpha=0 with "
                f"use_hard_labels, a plain language-model step): {error}") from error
    if teacher_state is None and not cached and "labels" not in batch:
        raise ConfigError("use_hard_labels without a teacher needs batch['labels']")
    if teacher_state is None and not cached and chunk is not None:
        raise ConfigError(f"logits_chunk_size={chunk} fuses the head with a teacher's targets; "
                          f"a hard-label-only step (no teacher, alpha=0) takes logits_chunk_size=None")


def _batch_sharding(partition_spec: PartitionSpec | NamedSharding | None) -> NamedSharding | None:
    """The batch's sharding with its mesh explicit: a NamedSharding as given; a bare
    PartitionSpec on the current mesh (``jax.set_mesh``), as EasyDeL's ``partition_spec`` is
    meant, looked up here, once, at the step's boundary (callers that hold their mesh, such as
    pipeline/train.py, pass a NamedSharding or pre-sharded arrays and need no current mesh).

    The mesh axes the spec names must be of type Auto (as
    ``pipeline.models.sharding.make_mesh`` makes them): on Explicit axes every op of the model
    would need its own sharding annotation.
    """
    if partition_spec is None:
        return None
    if isinstance(partition_spec, NamedSharding):
        mesh, spec = partition_spec.mesh, partition_spec.spec
    else:
        mesh, spec = jax.sharding.get_abstract_mesh(), partition_spec
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
    for entry in spec:
        for name in (entry if isinstance(entry, tuple) else (entry,)) if entry is not None else ():
            if axis_types.get(name) != jax.sharding.AxisType.Auto:
                raise ConfigError(
                    f"partition_spec {spec}: axis {name!r} must be an Auto axis of the mesh "
                    f"(a NamedSharding's or the current one, jax.set_mesh), got mesh axes "
                    f"{dict(zip(mesh.axis_names, map(str, mesh.axis_types)))}")
    return partition_spec if isinstance(partition_spec, NamedSharding) else NamedSharding(mesh, spec)


def _constrain(tree, sharding: NamedSharding | None):
    """Hints XLA to lay every batch array's leading axes out as ``sharding`` says."""
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def _microbatches(batch: Mapping[str, jax.Array], steps: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [steps, B // steps, ...]``, microbatch s holding rows ``s, s + steps, ...``.

    Strided rather than contiguous rows, so each microbatch takes an equal share of every
    data-parallel shard of the batch axis.
    """
    def split(x):
        x = jnp.asarray(x)
        return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)
    return {key: split(value) for key, value in batch.items()}


def _denominators(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Raw (unclamped) denominators of the three mean terms for ``batch``."""
    ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    row_tokens = (jnp.full(ids.shape[:1], ids.shape[1], jnp.float32) if attention_mask is None
                  else jnp.sum(attention_mask.astype(jnp.float32), axis=-1))
    return {
        "kd": jnp.sum(losses.loss_mask(attention_mask, batch.get("labels"), ids.shape)),
        "hidden": jnp.sum(row_tokens),
        "attention": jnp.sum(row_tokens * row_tokens),
    }


def distillation_step(
    student_state: TrainState,
    batch: Mapping[str, jax.Array],
    teacher_state: TrainState | None,
    loss_config: DistillLossConfig | None = None,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    partition_spec: PartitionSpec | NamedSharding | None = None,
    gradient_accumulation_steps: int = 1,
    is_training: bool = True,
    temperature: float = 4.0,
    alpha: float = 0.9,
    hidden_state_weight: float = 0.0,
    hidden_state_layers: tuple[int, ...] | None = None,
    hidden_state_loss: str = "mse",
    attention_weight: float = 0.0,
    attention_layers: tuple[int, ...] | None = None,
    attention_normalize: bool = False,
    logits_chunk_size: int | None = None,
) -> tuple[TrainState, LossMetrics]:
    """One distillation update (or, with ``is_training=False``, one evaluation) on ``batch``.

    Args:
      student_state: the student and its optimizer (``TrainState.create(model, tx)``).
      batch: ``input_ids`` ``[B, L]`` int32, optional ``attention_mask`` ``[B, L]``, aligned
        ``labels`` ``[B, L]`` (-100 = no loss) and ``segment_ids`` ``[B, L]`` (packed documents,
        ``pipeline.data.prepare``: the student and a live teacher keep each document to itself),
        and, without ``teacher_state``, the teacher's targets: ``teacher_logits`` ``[B, L, V]``
        or the top-k / sampled keys of pipeline/losses/targets.py.
      teacher_state: a frozen ``TrainState`` run live under ``stop_gradient``, or ``None``
        when the targets are in the batch. Hidden-state and attention terms need it. With
        ``alpha=0`` and ``use_hard_labels`` neither is needed: the step is then a plain
        language-model step on the labels (kl_loss, teacher_entropy, top1_agreement ``None``).
      loss_config: ``DistillLossConfig`` (divergence, beta, use_hard_labels); ``None`` = defaults.
      learning_rate_fn: schedule of the step counter, reported in the metrics only.
      partition_spec: sharding of the batch axes (e.g. ``PartitionSpec("data")``), applied to
        the batch and to every microbatch; a NamedSharding brings its mesh (no current mesh
        needed), a bare PartitionSpec refers to the current mesh (``jax.set_mesh``), as in
        EasyDeL; the named axes must be Auto axes (as ``pipeline.models.sharding.make_mesh``
        makes them).
      gradient_accumulation_steps: microbatches per update; must divide ``B``.
      is_training: ``False`` evaluates: same loss metrics, no gradient, state returned as is.
      temperature, alpha: KD temperature T > 0 and the KD/CE mix alpha in [0, 1].
      hidden_state_weight, hidden_state_layers, hidden_state_loss: weight (0 = off), indices
        into both models' ``hidden_states`` (negative allowed) and ``"mse"``/``"cosine"``.
      attention_weight, attention_layers, attention_normalize: same for attention maps.
      logits_chunk_size: tokens per chunk of a fused head + loss, so that no ``[tokens, vocab]``
        student logits exist (``None`` = plain logits). A live teacher still makes its logits.

    Returns:
      ``(new_state, LossMetrics)``. A non-finite loss or gradient leaves params, other
      variables, optimizer state and step unchanged and sets ``skipped_updates`` to 1; a batch
      without loss tokens does the same and sets ``empty_batches`` to 1 instead.

    Raises:
      KdpipeError (a ``ValueError``; ConfigError, DataError): bad arguments or batch, raised
      when the step is traced, before anything runs or is donated.
    """
    loss_config = DistillLossConfig() if loss_config is None else loss_config
    _check_arguments(student_state, batch, teacher_state, loss_config, partition_spec,
                     gradient_accumulation_steps, is_training, alpha, hidden_state_weight,
                     attention_weight, logits_chunk_size)
    sharding = _batch_sharding(partition_spec)
    batch = _constrain({key: jnp.asarray(value) for key, value in batch.items()}, sharding)
    denominators = _denominators(batch)
    totals = {key: jnp.maximum(value, 1.0) for key, value in denominators.items()}
    use_hidden, use_attention = hidden_state_weight > 0, attention_weight > 0
    kd_options = dict(use_hard_labels=loss_config.use_hard_labels, temperature=temperature,
                      alpha=alpha, divergence=loss_config.divergence, beta=loss_config.beta,
                      valid_vocab_size=loss_config.valid_vocab_size)

    def teacher_outputs(micro):
        if teacher_state is None:
            return None
        teacher = teacher_state.model()
        teacher.eval()
        out = teacher(micro["input_ids"], attention_mask=micro.get("attention_mask"),
                      output_hidden_states=use_hidden, output_attentions=use_attention,
                      segment_ids=micro.get("segment_ids"))
        return jax.lax.stop_gradient(out)

    def objective(params, other, micro, teacher_out):
        """This microbatch's share of the batch objective, its weighted terms and new ``other``."""
        student = student_state.replace(params=params, other=other).model()
        student.train() if is_training else student.eval()
        out = student(micro["input_ids"], attention_mask=micro.get("attention_mask"),
                      output_hidden_states=use_hidden, output_attentions=use_attention,
                      compute_logits=logits_chunk_size is None,
                      segment_ids=micro.get("segment_ids"))
        masks = dict(attention_mask=micro.get("attention_mask"), labels=micro.get("labels"))
        if teacher_out is not None:
            targets = losses.DenseTargets(teacher_out.logits)
        elif any(key.startswith("teacher_") for key in micro):
            targets = losses.targets_from_batch(micro)
        else:  # hard labels alone (_check_arguments): the KD term is the plain cross-entropy
            targets = None
        if targets is None:
            mask = losses.loss_mask(masks["attention_mask"], masks["labels"], out.logits.shape[:2])
            kd = losses.masked_token_mean(losses.token_cross_entropy(out.logits, masks["labels"]),
                                          mask)
            kd_metrics = {"ce_loss": kd}
        elif logits_chunk_size is None:
            kd, kd_metrics = losses.targets_distillation_loss(out.logits, targets, **masks,
                                                              **kd_options)
        else:
            kd, kd_metrics = fused_head_distillation_loss(
                out.last_hidden_state, student.output_head(), targets, **masks, **kd_options,
                chunk_size=logits_chunk_size)
        shares = {key: value / totals[key] for key, value in _denominators(micro).items()}
        terms = {name: kd_metrics[name] * shares["kd"]
                 for name in _KD_METRICS if name in kd_metrics}
        total = kd * shares["kd"]
        if use_hidden:
            terms["hidden_state_loss"] = shares["hidden"] * losses.hidden_state_loss(
                out.hidden_states, teacher_out.hidden_states, micro.get("attention_mask"),
                layers=hidden_state_layers, loss=hidden_state_loss)
            total = total + hidden_state_weight * terms["hidden_state_loss"]
        if use_attention:
            terms["attention_loss"] = shares["attention"] * losses.attention_loss(
                out.attentions, teacher_out.attentions, micro.get("attention_mask"),
                layers=attention_layers, normalize=attention_normalize)
            total = total + attention_weight * terms["attention_loss"]
        terms["loss"] = total
        return total, (terms, nnx.split(student, nnx.Param, ...)[2])

    def accumulate(carry, micro):
        grad_sum, other, term_sums = carry
        micro = _constrain(micro, sharding)
        teacher_out = teacher_outputs(micro)
        if is_training:
            grad_fn = jax.grad(objective, has_aux=True)
            grads, (terms, other) = grad_fn(student_state.params, other, micro, teacher_out)
            grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads)
        else:
            _, (terms, other) = objective(student_state.params, other, micro, teacher_out)
        term_sums = {name: term_sums[name] + value for name, value in terms.items()}
        return (grad_sum, other, term_sums), None

    # The carry's metric sums need their structure before the scan; trace one microbatch for it.
    micro_batches = _microbatches(batch, gradient_accumulation_steps)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    term_shapes = jax.eval_shape(lambda m: objective(student_state.params, student_state.other, m,
                                                     teacher_outputs(m))[1][0], first)
    zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), term_shapes)
    zero_grads = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), student_state.params)
                  if is_training else None)
    (grad_sum, other, term_sums), _ = jax.lax.scan(
        accumulate, (zero_grads, student_state.other, zero_terms), micro_batches)

    learning_rate = (None if learning_rate_fn is None
                     else jnp.asarray(learning_rate_fn(student_state.step)))
    metrics = LossMetrics(num_tokens=denominators["kd"].astype(jnp.int32),
                          learning_rate=learning_rate, **term_sums)
    if not is_training:
        return student_state, metrics

    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, student_state.params)
    grad_norm = optax.tree.norm(grads)
    # An overflowing norm counts as non-finite too: such an update would be garbage anyway.
    finite = jnp.isfinite(term_sums["loss"]) & jnp.isfinite(grad_norm)
    # A term with no token has a zero gradient (each is multiplied by its mask); with all of
    # them empty there is nothing to learn from, and a masked NaN is not a non-finite update.
    empty = denominators["kd"] == 0
    if use_hidden:
        empty &= denominators["hidden"] == 0
    if use_attention:
        empty &= denominators["attention"] == 0
    applied = finite & ~empty
    updates, opt_state = student_state.tx.update(grads, student_state.opt_state,
                                                 student_state.params)
    proposed = student_state.replace(params=optax.apply_updates(student_state.params, updates),
                                     other=other, opt_state=opt_state, step=student_state.step + 1)
    new_state = jax.tree.map(partial(jnp.where, applied), proposed, student_state)
    return new_state, metrics.replace(grad_norm=grad_norm,
                                      skipped_updates=(~finite & ~empty).astype(jnp.int32),
                                      empty_batches=empty.astype(jnp.int32))


#: The arguments of ``distillation_step`` that select code: static under ``jax.jit``.
STATIC_ARGNAMES = ("loss_config", "learning_rate_fn", "partition_spec",
                   "gradient_accumulation_steps", "is_training", "temperature", "alpha",
                   "hidden_state_weight", "hidden_state_layers", "hidden_state_loss",
                   "attention_weight", "attention_layers", "attention_normalize",
                   "logits_chunk_size")
_jit_update = jax.jit(distillation_step, static_argnames=STATIC_ARGNAMES,
                      donate_argnames=("student_state",))
_jit_evaluate = jax.jit(distillation_step, static_argnames=STATIC_ARGNAMES)
_PARAMETERS = inspect.signature(distillation_step)


def _jitted(args, kwargs) -> tuple[Any, dict[str, Any]]:
    """The jitted step for these arguments of ``distillation_step`` (update or evaluation) and
    the arguments by name, layer indices given as lists (as YAML gives them) made tuples."""
    arguments = _PARAMETERS.bind(*args, **kwargs).arguments
    for name in ("hidden_state_layers", "attention_layers"):
        if isinstance(arguments.get(name), list):
            arguments[name] = tuple(arguments[name])
    return (_jit_update if arguments.get("is_training", True) else _jit_evaluate), arguments


def jit_distillation_step(*args: Any, **kwargs: Any) -> tuple[TrainState, LossMetrics]:
    """``distillation_step`` compiled (same arguments), one executable per configuration and
    batch shape.

    Every argument but the student state, the batch and the teacher state is static; layer
    indices given as lists (as YAML gives them) are turned into tuples. Training donates
    ``student_state``: its buffers are reused for the new state, so only the returned state may
    be used afterwards. Evaluation (``is_training=False``) donates nothing.
    """
    jitted, arguments = _jitted(args, kwargs)
    return jitted(**arguments)


def lower_distillation_step(*args: Any, **kwargs: Any) -> jax.stages.Lowered:
    """The step ``jit_distillation_step`` runs for these arguments, lowered, not run.

    The states and the batch may be arrays or abstract ``jax.ShapeDtypeStruct``s (with their
    shardings), so a step at any scale can be examined without memory: ``.compile()`` it for
    XLA's ``memory_analysis()`` and ``cost_analysis()`` (benchmarks/bench_scale.py), or read
    ``.as_text()``. Lowering runs and donates nothing. For arguments a run has already
    stepped with, JAX's caches give the lowering and the executable back without compiling
    again.
    """
    jitted, arguments = _jitted(args, kwargs)
    return jitted.lower(**arguments)
