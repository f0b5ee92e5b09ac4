"""Hugging Face checkpoint directories <-> models of every family in ``pipeline.models.registry``.

A checkpoint directory holds ``config.json`` and the weights as safetensors: one
``model.safetensors``, or several files listed by ``model.safetensors.index.json``. kdpipe
reads safetensors only; pickle-based weights (``pytorch_model.bin``) are refused, never
unpickled. config.json's ``model_type`` picks the family; the family's name table (e.g.
``pipeline.models.llama.names``) maps Hugging Face tensor names to our parameter paths.
Checkpoints are read from a local directory, a kvstore URL (``gs://``, ``s3://``,
``http(s)://``) or ``hf://org/name[@revision]``, each host reading only the bytes of its own
slices (``pipeline.models.checkpoint_store``); they are written to a local directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from safetensors.numpy import save_file

from pipeline.errors import ConfigError, KdpipeError, ModelLoadError
from pipeline.models.checkpoint_store import (CheckpointStore, StoredTensor, open_checkpoint,
                                              read_header, read_slice, read_tensor_bytes)
from pipeline.models.layouts import Layout, NameRow
from pipeline.models.registry import config_from_hf, family_of
from pipeline.models.sharding import BATCH_SPEC, DEFAULT_RULES, Rules, param_path, spec_for

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' own default shard size ("5GB" in v4).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PARAM_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Hugging Face tensor: where it lives in our model and in the checkpoint."""

    path: tuple  # nnx state path
    hf_name: str
    layout: Layout
    shape: tuple  # ours (one layer's, for scanned layers)
    hf_shape: tuple
    layer: int | None = None  # its index along the parameter's [layers] axis when scanned


def _tensor_plan(state: nnx.State, hf_names: tuple[NameRow, ...],
                 num_layers: int) -> list[_Tensor]:
    """Every Hugging Face tensor of ``state`` with its Hugging Face name from the family's
    ``hf_names``, in transformers' order (embedding, then layer by layer, then the final norm
    and head). A parameter of scanned layers (``layers/attn/q_dnh``, ``pipeline.models.stack``)
    is ``num_layers`` tensors, one per index of its leading axis."""
    first_layer_row = next(r for r, row in enumerate(hf_names) if "{i}" in row[0])
    names = {}  # our path -> [(hf name, layout, order, layer index or None)]
    for row, (hf_template, our_template, layout) in enumerate(hf_names):
        if "{i}" not in hf_template:
            order = (-1 if row < first_layer_row else num_layers, row)
            names[our_template] = [(hf_template, layout, order, None)]
            continue
        names[our_template.replace("{i}/", "")] = [
            (hf_template.format(i=i), layout, (i, row), i) for i in range(num_layers)]
        for i in range(num_layers):
            names[our_template.format(i=i)] = [(hf_template.format(i=i), layout, (i, row), None)]
    plan = []
    for path, var in nnx.to_flat_state(state):
        for hf_name, layout, order, layer in names[param_path(path)]:
            shape = tuple(var.shape) if layer is None else tuple(var.shape[1:])
            plan.append((order, _Tensor(path, hf_name, layout, shape,
                                        tuple(layout.hf_shape(shape)), layer)))
    return [tensor for _, tensor in sorted(plan, key=lambda entry: entry[0])]


def _by_param(plan: list[_Tensor]) -> dict[tuple, list[_Tensor]]:
    """The tensors of ``plan`` grouped by parameter (a scanned one has one per layer, in layer
    order), in the order of their first tensor."""
    params: dict[tuple, list[_Tensor]] = {}
    for tensor in plan:
        params.setdefault(tensor.path, []).append(tensor)
    return params


def read_config(path: str | Path | CheckpointStore) -> Any:
    """The config of the checkpoint at ``path`` (a location ``open_checkpoint`` accepts, or one
    it opened), its ``config.json``, read by the family of its ``model_type``
    (``pipeline.models.registry``).

    Raises:
      ModelLoadError: no checkpoint there, no or unreadable config.json, or an unsupported
        ``model_type`` (the message lists the supported ones) or config.
    """
    store = path if isinstance(path, CheckpointStore) else open_checkpoint(path)
    text = store.read(CONFIG_FILE)
    if text is None:
        raise ModelLoadError(f"{store.location!r}: no {CONFIG_FILE}")
    config_file = store.url(CONFIG_FILE)
    try:
        hf = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config_file}: not valid JSON ({err})") from err
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object, got {type(hf).__name__}")
    try:
        return config_from_hf(hf)
    except ModelLoadError as err:
        raise ModelLoadError(f"{store.location}/{err}") from err


def _stored_tensors(store: CheckpointStore) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint's safetensors files (those of its index file, else
    model.safetensors), from their headers; a name may occur once."""
    index = store.read(INDEX_FILE)
    if index is not None:
        try:
            weight_map = json.loads(index)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{store.url(INDEX_FILE)}: expected JSON with a 'weight_map' "
                                 f"({type(err).__name__}: {err})") from err
        absent = [name for name in files if store.read(name, slice(0, 8)) is None]
        if absent:
            raise ModelLoadError(f"{store.url(INDEX_FILE)} lists files that do not exist: {absent}")
    elif store.read(SINGLE_FILE, slice(0, 8)) is not None:
        files = [SINGLE_FILE]
    else:
        pickles = [name for name in store.names() or () if name.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise ModelLoadError(
                f"{store.location!r} holds only pickle-based weights ({', '.join(pickles)}); "
                f"kdpipe reads safetensors only and never unpickles. Convert them first, e.g. "
                f"with transformers: model.save_pretrained(dir, safe_serialization=True)")
        raise ModelLoadError(f"{store.location!r}: no {SINGLE_FILE} and no {INDEX_FILE}")
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        for name, tensor in read_header(store, file).items():
            if name in tensors:
                raise ModelLoadError(f"tensor {name!r} is stored twice: in "
                                     f"{tensors[name].file} and {file}")
            tensors[name] = tensor
    return tensors


def _param_dtype(dtype, name: str = "dtype") -> jnp.dtype:
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as err:
        raise ConfigError(f"{name}: expected one of {_PARAM_DTYPES}, got {dtype!r}") from err
    if dtype.name not in _PARAM_DTYPES:
        raise ConfigError(f"{name}: expected one of {_PARAM_DTYPES}, got {dtype.name!r}")
    return dtype


def load_pretrained(path: str | Path, *, dtype=jnp.float32, param_dtype=None,
                    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                    attention: str = "auto", scan_layers: bool = False,
                    remat: str = "none") -> nnx.Module:
    """Loads the Hugging Face checkpoint at ``path`` (a local directory, a kvstore URL or
    ``hf://org/name[@revision]``: ``checkpoint_store.open_checkpoint``) into a model of its
    family (e.g. ``Llama``) computing in ``dtype``, with its parameters in ``param_dtype``
    (``None``: ``dtype``). Weights stored in bfloat16 load exactly into float32 parameters.

    With a ``mesh``, each parameter is created directly with its ``NamedSharding`` under
    ``rules``: each process reads from the checkpoint only the bytes of its own devices'
    slices (the Hugging Face rows they cover), a device receives only its own slice, the host
    holds one parameter's slices at a time, and the layers' activations are held split over
    the batch (``BATCH_SPEC``). Without one, parameters go to the default device.
    ``attention``, ``scan_layers``, ``remat``: the model's attention implementation
    (``pipeline.models.attention``), its layers stacked and scanned or not, and their
    rematerialisation (``pipeline.models.stack``).

    Raises:
      ModelLoadError: unsupported config, no safetensors weights (pickle-only directories are
        refused unread), or tensors missing, unexpected or of the wrong shape (all listed).
      ConfigError: ``dtype`` or ``param_dtype`` is not a float parameter dtype, or ``rules``
        do not cover the model.
    """
    store = open_checkpoint(path)
    config = read_config(store)
    dtype = _param_dtype(dtype)
    param_dtype = dtype if param_dtype is None else _param_dtype(param_dtype, "param_dtype")
    family = family_of(config.model_type)
    batch_sharding = None if mesh is None else NamedSharding(mesh, BATCH_SPEC)
    abstract = nnx.eval_shape(lambda: family.model(
        config, dtype=dtype, param_dtype=param_dtype, attention=attention,
        scan_layers=scan_layers, remat=remat, batch_sharding=batch_sharding, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    plan = _tensor_plan(abstract_state, family.hf_names, config.num_hidden_layers)
    shapes = {param: tuple(var.shape) for param, var in nnx.to_flat_state(abstract_state)}
    shardings = {}  # decided before any weight is read, so bad rules fail fast
    if mesh is not None:
        shardings = {param: NamedSharding(mesh, spec_for(param_path(param), shape, mesh, rules))
                     for param, shape in shapes.items()}
    stored = _stored_tensors(store)
    _check_tensors(store.location, config, plan, stored)
    values = {}
    for param, tensors in _by_param(plan).items():
        shape = shapes[param]
        if mesh is None:
            values[param] = jax.device_put(
                _read_box(store, stored, tensors, tuple(slice(0, n) for n in shape), param_dtype))
            continue
        # This process reads its devices' slices once, as their bounding box (a whole replica
        # when they cover it), so devices that share rows do not each read them again.
        sharding = shardings[param]
        spans = [[part.indices(n)[:2] for part, n in zip(index, shape)]
                 for index in sharding.addressable_devices_indices_map(shape).values()]
        box = tuple(slice(min(dim)[0], max(stop for _, stop in dim)) for dim in zip(*spans))
        host = _read_box(store, stored, tensors, box, param_dtype)
        values[param] = jax.make_array_from_callback(
            shape, sharding, lambda index, host=host, box=box: host[tuple(
                slice(part.indices(n)[0] - outer.start, part.indices(n)[1] - outer.start)
                for part, outer, n in zip(index, box, shape))])
    state = nnx.from_flat_state([
        (param, var.replace(values[param])) for param, var in nnx.to_flat_state(abstract_state)
    ])
    return nnx.merge(graphdef, state)


def _read_box(store: CheckpointStore, stored: dict[str, StoredTensor], tensors: list[_Tensor],
              box: tuple[slice, ...], param_dtype) -> np.ndarray:
    """The slice ``box`` (a ``slice(start, stop)`` per axis) of the parameter made of
    ``tensors`` (one, or a scanned parameter's per-layer tensors stacked), in ``param_dtype``,
    reading only the checkpoint bytes it covers."""
    if tensors[0].layer is None:
        (t,) = tensors
        part = read_slice(store, stored[t.hf_name], t.layout, t.shape, box)
    else:
        part = np.stack([read_slice(store, stored[t.hf_name], t.layout, t.shape, box[1:])
                         for t in tensors[box[0]]])
    return np.asarray(part, param_dtype)


def _check_tensors(location: str, config, plan: list[_Tensor],
                   stored: dict[str, StoredTensor]) -> None:
    """Raises one ModelLoadError listing every missing, unexpected and mis-shaped tensor
    (tensors the family ignores, as transformers does, are neither)."""
    expected = {tensor.hf_name for tensor in plan}
    ignored_tensor = family_of(config.model_type).ignored_tensor
    ignored = {name for name in stored if ignored_tensor(config, name)}
    missing = sorted(expected - set(stored))
    unexpected = sorted(set(stored) - expected - ignored)
    found = {t.hf_name: stored[t.hf_name].shape for t in plan if t.hf_name in stored}
    misshaped = [f"{t.hf_name}: expected {t.hf_shape}, found {found[t.hf_name]}"
                 for t in plan if found.get(t.hf_name, t.hf_shape) != t.hf_shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"tensors of the wrong shape: {'; '.join(misshaped)}")
    if problems:
        raise ModelLoadError(
            f"{location!r} does not match its config.json (model_type {config.model_type!r}, "
            f"{config.num_hidden_layers} layers): " + ". ".join(problems)
        )


def _to_host(value: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from all processes when sharded across hosts)."""
    if value.is_fully_addressable:
        return np.asarray(jax.device_get(value))
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def save_pretrained(model: nnx.Module, path: str | Path, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes ``model`` as a Hugging Face checkpoint that transformers loads unchanged.

    The weights are written in the model's compute dtype (``torch_dtype``), whatever dtype its
    parameters are kept in. ``config.json`` plus ``model.safetensors``, or, when the weights
    exceed ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors`` files and
    ``model.safetensors.index.json``. Weight files
    of an earlier save into ``path`` that this one does not rewrite are removed, so the directory
    never mixes two saves. In a multi-process run every process must call this (the parameters
    are gathered); process 0 writes. A ``path`` that is a file is refused (``KdpipeError``).
    """
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes: expected > 0, got {max_shard_bytes}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KdpipeError(f"{path}: exists and is not a directory; export the model to a new or "
                          f"an existing directory instead")
    config = model.config
    plan = _tensor_plan(nnx.state(model), family_of(config.model_type).hf_names,
                        config.num_hidden_layers)
    leaves = dict(nnx.to_flat_state(nnx.state(model)))
    shards: list[list[_Tensor]] = [[]]
    shard_bytes = 0
    for tensor in plan:
        nbytes = int(np.prod(tensor.shape)) * model.dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += nbytes
    if len(shards) == 1:
        file_names = [SINGLE_FILE]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(len(shards))]

    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        for old in path.iterdir():
            stale = old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(old.name)
            if stale and old.name not in file_names:
                old.unlink()
    def value(t: _Tensor) -> jax.Array:
        whole = leaves[t.path].get_value()
        return whole if t.layer is None else whole[t.layer]

    weight_map, total_bytes = {}, 0
    for file_name, shard in zip(file_names, shards):
        tensors = {
            t.hf_name: np.ascontiguousarray(t.layout.to_hf(_to_host(value(t).astype(model.dtype))))
            for t in shard
        }
        if writer:
            save_file(tensors, path / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        total_bytes += sum(array.nbytes for array in tensors.values())
    if not writer:
        return
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    dtype_name = model.dtype.name
    # transformers v5 reads "dtype", v4 and vLLM "torch_dtype".
    hf = {**config.to_hf_config(), "dtype": dtype_name, "torch_dtype": dtype_name}
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def teacher_fingerprint(path: str | Path) -> str:
    """``"sha256:<hex>"`` over a checkpoint's architecture and weights, for the cache manifest.

    Hashes the interpreted config (not config.json's bytes, so bookkeeping keys such
    as ``transformers_version`` do not count) and every stored tensor in name order (name,
    dtype, shape, bytes), so it does not depend on how the weights are split into files.
    Reads every weight once.
    """
    store = open_checkpoint(path)
    config = read_config(store)
    architecture = dataclasses.asdict(config)
    for bookkeeping in ("extra_hf_fields", "initializer_range", "max_position_embeddings"):
        del architecture[bookkeeping]
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
    for name, tensor in sorted(_stored_tensors(store).items()):
        digest.update(json.dumps([name, tensor.dtype.name, list(tensor.shape)]).encode())
        digest.update(read_tensor_bytes(store, tensor))
    return f"sha256:{digest.hexdigest()}"
