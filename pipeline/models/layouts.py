"""How a tensor's Hugging Face (torch) layout relates to ours, for the families' name tables.

A family's name table (e.g. ``pipeline.models.llama.names``) pairs each Hugging Face tensor name
with our parameter path and one of these layouts; ``pipeline.models.hf_io`` applies them on load
and save. ``s`` is our shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Layout(NamedTuple):
    """How one tensor's Hugging Face layout relates to ours (``s`` is our shape)."""

    hf_shape: Callable[[tuple], tuple]
    to_ours: Callable[[np.ndarray, tuple], np.ndarray]  # (hf tensor, our shape) -> view
    to_hf: Callable[[np.ndarray], np.ndarray]


# A name table row: (Hugging Face name, our parameter path, layout); ``{i}`` is the layer index.
NameRow = tuple[str, str, Layout]

SAME = Layout(lambda s: s, lambda w, s: w, lambda x: x)
# torch Linear weights are [out, in]; ours are [in, out].
LINEAR = Layout(lambda s: (s[1], s[0]), lambda w, s: w.T, lambda x: x.T)
# q/k/v: [heads*head_dim, hidden] <-> [hidden, heads, head_dim]
HEADS_IN = Layout(
    lambda s: (s[1] * s[2], s[0]),
    lambda w, s: w.reshape(s[1], s[2], s[0]).transpose(2, 0, 1),
    lambda x: x.transpose(1, 2, 0).reshape(x.shape[1] * x.shape[2], x.shape[0]),
)
# o: [hidden, heads*head_dim] <-> [heads, head_dim, hidden]
HEADS_OUT = Layout(
    lambda s: (s[2], s[0] * s[1]),
    lambda w, s: w.reshape(s[2], s[0], s[1]).transpose(1, 2, 0),
    lambda x: x.transpose(2, 0, 1).reshape(x.shape[2], x.shape[0] * x.shape[1]),
)
# q/k/v bias: [heads*head_dim] <-> [heads, head_dim]
HEAD_BIAS = Layout(lambda s: (s[0] * s[1],), lambda w, s: w.reshape(s), lambda x: x.reshape(-1))
