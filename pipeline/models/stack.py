"""A decoder's stack of layers: a Python list, or one stacked module run by a scan; with or
without rematerialisation. Any family's model builds its layers with ``make_layers`` and runs
them with ``run_layers``.

Scanned (``scan_layers=True``): every layer parameter gets a leading ``[layers]`` axis and one
compiled layer body runs over it (``nnx.vmap`` to create, ``nnx.scan`` to run, as in flax's
NNX transforms guide), so compile time and the program's size no longer grow with depth.
The parameter paths lose their layer index (``layers/attn/q_dnh`` of shape
``[layers, hidden, heads, head_dim]`` instead of ``layers/0/attn/q_dnh``);
``pipeline.models.hf_io`` stacks and unstacks the per-layer Hugging Face tensors and
``pipeline.models.sharding`` leaves the leading axis unsharded. Looped (the default): a
``nnx.List`` of layers, paths ``layers/<i>/...``.

Rematerialisation (``remat``, ``REMAT_POLICIES``): what a layer's backward pass keeps from its
forward pass, as a ``jax.checkpoint`` policy around each layer (``jax.checkpoint_policies``):

- ``none``: no checkpoint; everything the backward pass uses is kept (XLA's choice).
- ``full``: ``nothing_saveable``: only the layer's input is kept; the whole layer is recomputed.
- ``save_dots``: ``dots_with_no_batch_dims_saveable``: the matmul outputs against the weights
  are kept, the rest (norms, activations, attention) recomputed.
- ``offload``: ``offload_dot_with_no_batch_dims``: as ``save_dots``, the saved matmul outputs
  held in pinned host memory instead of the device's. Refused on the CPU backend, which has no
  separate host memory to offload to (``ConfigError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from pipeline.errors import ConfigError

REMAT_POLICIES = ("none", "full", "save_dots", "offload")


def remat_policy(remat: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy of ``remat`` (one of ``REMAT_POLICIES``); ``None`` for
    ``none`` (no checkpoint at all).

    Raises:
      ConfigError: an unknown name, or ``offload`` on the CPU backend.
    """
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"model.<student|teacher>.remat: expected one of {REMAT_POLICIES}, "
                          f"got {remat!r}")
    if remat == "offload" and jax.default_backend() == "cpu":
        raise ConfigError("model.<student|teacher>.remat: 'offload' moves saved activations to "
                          "pinned host memory, which the cpu backend does not have; use "
                          "'save_dots' (the same activations kept on the device) or 'full'")
    policies = jax.checkpoint_policies
    if remat == "none":
        return None
    if remat == "offload":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return {"full": policies.nothing_saveable,
            "save_dots": policies.dots_with_no_batch_dims_saveable}[remat]


def make_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs, *,
                scan_layers: bool) -> nnx.Module:
    """``num_layers`` layers ``make(rngs)``: one module with stacked parameters when
    ``scan_layers``, else an ``nnx.List``. (The two initialise from different random streams:
    the same seed gives different weights.)"""
    if not scan_layers:
        return nnx.List([make(rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
        return make(rngs)

    return stacked(rngs)


def run_layers(layers: nnx.Module, x: jax.Array, body: Callable[[nnx.Module, jax.Array], Any],
               *, scan_layers: bool, remat: str) -> tuple[jax.Array, list[Any]]:
    """Runs ``x`` through ``layers`` (as ``make_layers`` built them):
    ``x, out = body(layer, x)`` layer by layer.

    Returns:
      ``(x after the last layer, [out of each layer])``. Scanned, each ``out`` is a layer's
      slice of the scan's stacked outputs (a pytree of arrays, or ``None``s).
    """
    policy = remat_policy(remat)
    if remat != "none":
        body = nnx.remat(body, policy=policy, prevent_cse=not scan_layers)
    if not scan_layers:
        outs = []
        for layer in layers:
            x, out = body(layer, x)
            outs.append(out)
        return x, outs

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
    def scan(layer, x):
        return body(layer, x)

    x, stacked = scan(layers, x)
    num_layers = jax.tree.leaves(nnx.state(layers))[0].shape[0]
    return x, [jax.tree.map(lambda y, i=i: y[i], stacked) for i in range(num_layers)]
