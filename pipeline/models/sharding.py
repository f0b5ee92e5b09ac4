"""How model parameters and batches are laid out over a device mesh.

The mesh has three named axes (``make_mesh``): ``data`` (pure data parallelism, parameters
replicated), ``fsdp`` (data parallelism with parameters sharded, gathered per layer by XLA) and
``tensor`` (attention heads, MLP columns and the vocabulary split across devices). One rule table
maps a parameter's path, such as ``layers/3/attn/q_dnh``, to a ``PartitionSpec``; loading
(``hf_io.load_pretrained``) and the training step both take their layout from it. The mesh is
always passed in; nothing here reads a global mesh.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from pipeline.config import MESH_AXES
from pipeline.errors import ConfigError

DATA, FSDP, TENSOR = MESH_AXES

# A batch's leading axis is split over every data-parallel device (data and fsdp).
BATCH_SPEC = P((DATA, FSDP))


def batch_devices(mesh: Mesh) -> int:
    """How many ways ``BATCH_SPEC`` splits a batch on ``mesh``: its data-parallel devices."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_SPEC[0]]))

Rules = tuple[tuple[str, P], ...]

# (regex searched in the parameter path, spec). The first match wins. The axis suffix of each
# name says what each spec entry shards: q_dnh is [hidden, heads, head_dim].
DEFAULT_RULES: Rules = (
    (r"(^|/)(embedding_vd|lm_head_vd)$", P(TENSOR, FSDP)),
    (r"/attn/(q_dnh|k_dkh|v_dkh)$", P(FSDP, TENSOR, None)),
    (r"/attn/(q_bias_nh|k_bias_kh|v_bias_kh)$", P(TENSOR, None)),
    (r"/attn/o_nhd$", P(TENSOR, None, FSDP)),
    (r"/mlp/(gate_df|up_df)$", P(FSDP, TENSOR)),
    (r"/mlp/down_fd$", P(TENSOR, FSDP)),
    (r"(^|/)scale$", P()),  # RMSNorm scales: small, replicated
)

# Scanned layers (pipeline.models.stack) are stacked under "layers/" with no layer index in the
# path ("layers/attn/q_dnh"): a rule's spec applies to the dimensions after the leading
# [layers] axis, which stays unsharded.
_STACKED = re.compile(r"^layers/(?!\d+(/|$))")


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

    One size may be -1: it takes the devices the others leave.

    Raises:
      ConfigError: the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(zip(MESH_AXES, (data, fsdp, tensor)))
    free = [name for name, size in sizes.items() if size == -1]
    bad = [f"{name}={size}" for name, size in sizes.items() if size != -1 and size < 1]
    if len(free) > 1 or bad:
        raise ConfigError(
            f"mesh: expected positive axis sizes (at most one -1), got data={data}, fsdp={fsdp}, "
            f"tensor={tensor}"
        )
    known = int(np.prod([size for size in sizes.values() if size != -1]))
    if free and len(devices) % known == 0:
        sizes[free[0]] = len(devices) // known
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ConfigError(
            f"mesh: data*fsdp*tensor ({data}*{fsdp}*{tensor}) must equal the number of devices, "
            f"{len(devices)}"
        )
    # Auto axes: XLA propagates shardings through the model's einsums. (jax.make_mesh defaults
    # to Explicit axes, which would need a sharding annotation on every op.)
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, (AxisType.Auto,) * 3, devices=devices)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The ``PartitionSpec`` of the parameter at ``path`` (``"layers/0/attn/q_dnh"``).

    A mesh axis that does not divide its dimension is dropped from that dimension, which is
    then replicated (e.g. 2 key/value heads on a 4-way tensor axis). A parameter of scanned
    layers (``"layers/attn/q_dnh"``, a leading ``[layers]`` axis) takes its rule's spec after
    an unsharded layer axis.

    Raises:
      ConfigError: no rule matches ``path``, or the matching spec's rank is not ``len(shape)``.
    """
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        raise ConfigError(f"sharding rules: no rule matches parameter {path!r}")
    if len(spec) == 0:  # P(): replicated, whatever the rank
        return spec
    if _STACKED.match(path):
        return P(None, *spec_for(path.replace("layers/", "layers/0/", 1), shape[1:], mesh, rules))
    if len(spec) != len(shape):
        raise ConfigError(
            f"sharding rules: rule {pattern!r} gives {spec} of rank {len(spec)} for parameter "
            f"{path!r} of shape {tuple(shape)}"
        )
    kept = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[name] for name in names]))
        kept.append(axes if names and dim % size == 0 else None)
    return P(*kept)


def param_path(path: tuple) -> str:
    """``('layers', 0, 'attn', 'q_dnh')`` -> ``'layers/0/attn/q_dnh'``."""
    return "/".join(str(part) for part in path)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A state of ``NamedSharding`` with the structure of ``state`` (concrete or abstract),
    usable as ``jax.jit`` in/out shardings or with ``jax.device_put``."""
    return nnx.from_flat_state([
        (path, var.replace(NamedSharding(mesh, spec_for(param_path(path), var.shape, mesh, rules))))
        for path, var in nnx.to_flat_state(state)
    ])


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Moves ``model``'s parameters, in place, to their sharding under ``rules``."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
