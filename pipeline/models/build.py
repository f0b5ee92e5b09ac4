"""The model a ``ModelSpec`` (``model.teacher`` / ``model.student``) describes.

``build_model`` is the one way a run gets a model: the student and a live teacher in
``pipeline.train``, the teacher of ``kdpipe cache`` and of the teacher hosts. It loads the
spec's Hugging Face directory (``hf_io.load_pretrained``) or initialises the spec's
architecture (``ModelSpec.hf_config``, read by the family of its ``model_type``). Next to it:
the context check a spec is held to before any weight is read, and the fingerprint that ties
a checkpoint to its student.
"""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pipeline.config import ModelSpec, check_context, stable_hash
from pipeline.models.checkpoint_store import open_checkpoint
from pipeline.models.hf_io import CONFIG_FILE, load_pretrained, read_config, teacher_fingerprint
from pipeline.models.registry import config_from_hf, family_of
from pipeline.models.sharding import BATCH_SPEC, shard_model


def build_model(spec: ModelSpec, vocab_size: int | None = None, seed: int = 0,
                mesh: Mesh | None = None, *, frozen: bool = False) -> nnx.Module:
    """The model of ``spec``: loaded from ``spec.path`` (a local directory, a kvstore URL or
    ``hf://org/name[@revision]``; each process reading only its devices' slices),
    or initialised from ``seed`` with the architecture of the spec and ``vocab_size`` (the
    tokenizer's, unless the spec sets one; unused for a loaded model). Its parameters are laid
    out on ``mesh`` by ``pipeline.models.sharding``'s rules (and its activations split over
    the batch, ``BATCH_SPEC``), or on the default device without one.

    It computes in ``spec.dtype``, its attention with ``spec.attention``, its layers scanned
    and rematerialised as ``spec.scan_layers`` and ``spec.remat`` say. A model to train
    keeps its parameters in ``spec.param_dtype`` (unset: float32 master weights); a ``frozen``
    one (a teacher) keeps them in ``spec.dtype``: it is never updated, so it has no small
    update to lose, and a bfloat16 teacher takes half the memory.

    Raises:
      ModelLoadError: ``spec.path`` is not a checkpoint kdpipe reads (see ``load_pretrained``).
    """
    param_dtype = spec.dtype if frozen else spec.param_dtype or "float32"
    if spec.from_pretrained:
        return load_pretrained(spec.path, dtype=spec.dtype, param_dtype=param_dtype, mesh=mesh,
                               attention=spec.attention, scan_layers=spec.scan_layers,
                               remat=spec.remat)
    if vocab_size is None and spec.vocab_size is None:
        raise ValueError("build_model: an initialised model needs vocab_size (the tokenizer's) "
                         "when its spec sets none")
    config = config_from_hf(spec.hf_config(vocab_size))
    batch_sharding = None if mesh is None else NamedSharding(mesh, BATCH_SPEC)
    model = family_of(config.model_type).model(config, dtype=spec.dtype, param_dtype=param_dtype,
                                               attention=spec.attention,
                                               scan_layers=spec.scan_layers, remat=spec.remat,
                                               batch_sharding=batch_sharding,
                                               rngs=nnx.Rngs(seed))
    if mesh is not None:
        shard_model(model, mesh)
    return model


def check_model_context(spec: ModelSpec, name: str, seq_len: int) -> None:
    """Refuse rows of ``seq_len`` tokens past the context of ``model.<name>``
    (``pipeline.config.check_context``): the ``max_position_embeddings`` of its config.json
    when it is loaded from ``spec.path`` (read before any weight), else of the spec."""
    if spec.from_pretrained:
        store = open_checkpoint(spec.path)
        check_context(seq_len, f"model.{name}", read_config(store).max_position_embeddings,
                      origin=f", in {store.url(CONFIG_FILE)}")
    else:
        check_context(seq_len, f"model.{name}", spec.max_position_embeddings)


def model_fingerprint(spec: ModelSpec, vocab_size: int, seed: int) -> str:
    """Identifies a model's architecture and initial weights, for checkpoint identity: the
    weights' hash for a loaded model, the architecture and seed for an initialised one."""
    if spec.from_pretrained:
        return teacher_fingerprint(spec.path)
    return "init:" + stable_hash({"architecture": spec.hf_config(vocab_size), "seed": seed})
