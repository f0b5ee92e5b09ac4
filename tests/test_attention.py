"""pipeline.models.attention against a float64 numpy reference (outputs and dq, dk, dv), and
the blockwise implementation's XLA memory (compile only) against the dense one's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.models import attention as attn


def allowed_np(batch, seq, *, causal=True, sliding_window=None, padding_mask=None,
               segment_ids=None):
    """``[b, l, l]`` bool, element by element from the definitions."""
    out = np.ones((batch, seq, seq), bool)
    for b in range(batch):
        for i in range(seq):
            for j in range(seq):
                if causal and j > i:
                    out[b, i, j] = False
                if sliding_window is not None and i - j >= sliding_window:
                    out[b, i, j] = False
                if padding_mask is not None and not padding_mask[b, j]:
                    out[b, i, j] = False
                if segment_ids is not None and segment_ids[b, i] != segment_ids[b, j]:
                    out[b, i, j] = False
    return out


def reference_np(q, k, v, allowed, scale, d_out):
    """float64 ``(out, dq, dk, dv)`` of softmax attention, one query head at a time; a row with
    no allowed key gives 0. The backward is the softmax's:
    ``ds = p ∘ (dp − rowsum(dp ∘ p))``, ``dp = do vᵀ``."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    n, num_kv = q.shape[2], k.shape[2]
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    has_key = allowed.any(-1, keepdims=True)
    for head in range(n):
        kv = head // (n // num_kv)
        s = np.einsum("bqh,bmh->bqm", q[:, :, head], k[:, :, kv]) * scale
        s = np.where(allowed, s, -np.inf)
        p = np.where(allowed, np.exp(s - np.where(has_key, s.max(-1, keepdims=True), 0)), 0)
        p /= np.where(has_key, p.sum(-1, keepdims=True), 1)
        out[:, :, head] = p @ v[:, :, kv]
        dp = d_out[:, :, head] @ v[:, :, kv].transpose(0, 2, 1)
        ds = p * (dp - (dp * p).sum(-1, keepdims=True))
        dq[:, :, head] = ds @ k[:, :, kv] * scale
        dk[:, :, kv] += ds.transpose(0, 2, 1) @ q[:, :, head] * scale
        dv[:, :, kv] += p.transpose(0, 2, 1) @ d_out[:, :, head]
    return out, dq, dk, dv


def random_case(seed, *, batch=2, seq=40, heads=4, kv_heads=2, head_dim=8, dtype="float32"):
    rng = np.random.default_rng(seed)

    def draw(*shape):  # values exactly representable in dtype, so the reference sees them too
        return np.asarray(jnp.asarray(rng.normal(size=shape), dtype).astype(jnp.float32))

    return (draw(batch, seq, heads, head_dim), draw(batch, seq, kv_heads, head_dim),
            draw(batch, seq, kv_heads, head_dim), rng)


def left_padding_with_holes(rng, batch, seq):
    mask = rng.random((batch, seq)) > 0.2
    mask[0, :5] = False  # left padding: queries 0..4 of row 0 have no key at all
    return mask


def packed_segments(rng, batch, seq):
    return np.sort(rng.integers(0, 4, (batch, seq)), axis=1)  # documents back to back


CASES = {  # 4 query heads on 2 key/value heads unless said; seq 40, blocks of 16
    "causal": dict(),
    "sliding_window": dict(sliding_window=7),
    "padding_segments": dict(padding=True, segments=True),
    "window_padding_segments_mqa": dict(sliding_window=11, padding=True, segments=True,
                                        kv_heads=1),
    "not_causal_padding_segments": dict(causal=False, padding=True, segments=True),
    "seq_one_block": dict(seq=13),
}


def run_case(implementation, case, dtype, block_size=16):
    """``(ours, reference, has_key)``: out, dq, dk, dv both ways on one random case."""
    seed = list(CASES).index(case)
    case = dict(CASES[case])
    padding, segments = case.pop("padding", False), case.pop("segments", False)
    shape = {key: case.pop(key) for key in ("seq", "kv_heads") if key in case}
    q, k, v, rng = random_case(seed, dtype=dtype, **shape)
    batch, seq = q.shape[:2]
    masks = dict(case, padding_mask=left_padding_with_holes(rng, batch, seq) if padding else None,
                 segment_ids=packed_segments(rng, batch, seq) if segments else None)
    allowed = allowed_np(batch, seq, **masks)
    has_key = allowed.any(-1)
    # Rows with no key to attend are padding: their (implementation-defined) output gets no
    # gradient, as the losses' masks ensure in training.
    d_out = rng.normal(size=q.shape) * has_key[:, :, None, None]
    d_out = np.asarray(jnp.asarray(d_out, dtype).astype(jnp.float32))
    scale = q.shape[-1] ** -0.5
    expected = reference_np(q, k, v, allowed, scale, d_out)

    arrays = {key: None if value is None else jnp.asarray(value)
              for key, value in masks.items() if key in ("padding_mask", "segment_ids")}
    flags = {key: value for key, value in masks.items() if key not in arrays}

    def forward(q, k, v):
        if implementation == "fused_xla":  # the cuDNN path's arguments, on jax's dense kernel
            return attn.fused_attention(q, k, v, **flags, **arrays, implementation="xla")
        return attn.attention(q, k, v, **flags, **arrays, implementation=implementation,
                              block_size=block_size)

    @jax.jit
    def forward_backward(q, k, v, d_out):
        out, vjp = jax.vjp(forward, q, k, v)
        return (out, *vjp(d_out.astype(out.dtype)))

    ours = forward_backward(*(jnp.asarray(x, dtype) for x in (q, k, v, d_out)))
    assert all(x.dtype == jnp.dtype(dtype) for x in ours)
    return [np.asarray(x.astype(jnp.float32), np.float64) for x in ours], expected, has_key


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("implementation", ["blockwise", "xla", "fused_xla"])
def test_matches_float64_reference_float32(implementation, case):
    ours, expected, has_key = run_case(implementation, case, "float32")
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        got, want = (got[has_key], want[has_key]) if name == "out" else (got, want)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=name)
    assert np.isfinite(ours[0]).all()
    if implementation == "blockwise":  # a query with no key gives 0 (the dense path: an average)
        assert (ours[0][~has_key] == 0).all()


@pytest.mark.parametrize("implementation", ["blockwise", "xla"])
def test_matches_float64_reference_bfloat16(implementation, case="window_padding_segments_mqa"):
    # Softmax in float32, matmul operands (probabilities, score gradients) in bfloat16: errors
    # of a few bfloat16 ulps (2^-8 relative) of the largest values.
    ours, expected, has_key = run_case(implementation, case, "bfloat16")
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        got, want = (got[has_key], want[has_key]) if name == "out" else (got, want)
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max(), name


def test_blockwise_seq_not_a_multiple_of_the_block():
    # 40 = 5 blocks of 7 + 5 padded positions; the window skips blocks on both sides.
    ours, expected, has_key = run_case("blockwise", "window_padding_segments_mqa", "float32",
                                       block_size=7)
    np.testing.assert_allclose(ours[0][has_key], expected[0][has_key], atol=2e-5, rtol=1e-4)
    for got, want in zip(ours[1:], expected[1:]):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_splash_kernel_arguments_in_interpret_mode():
    # The TPU kernel emulated on this CPU: masks, GQA, padding-as-segments and scaling.
    q, k, v, rng = random_case(3, batch=1, seq=128, head_dim=64)
    pad, seg = left_padding_with_holes(rng, 1, 128), packed_segments(rng, 1, 128)
    allowed = allowed_np(1, 128, sliding_window=50, padding_mask=pad, segment_ids=seg)
    expected = reference_np(q, k, v, allowed, 64 ** -0.5, np.zeros_like(q))[0]
    out = jax.jit(lambda q, k, v: attn.splash_attention(
        q, k, v, sliding_window=50, padding_mask=jnp.asarray(pad), segment_ids=jnp.asarray(seg),
        interpret=True))(q, k, v)
    has_key = allowed.any(-1)
    np.testing.assert_allclose(np.asarray(out)[has_key], expected[has_key], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("platform, devices, dtype, seq, expected", [
    ("cpu", 1, "bfloat16", 4096, "blockwise"),
    ("cpu", 1, "float32", 512, "xla"),          # one block: the dense path, same memory, faster
    ("gpu", 8, "bfloat16", 4096, "cudnn"),
    ("gpu", 1, "float32", 4096, "blockwise"),   # cuDNN's flash attention is 16-bit only
    ("tpu", 1, "float32", 4096, "splash"),
    ("tpu", 1, "float32", 4000, "blockwise"),   # splash needs a multiple of 128
    ("tpu", 4, "float32", 4096, "blockwise"),   # and a shard_map on a mesh (not done)
])
def test_auto_picks_by_platform(platform, devices, dtype, seq, expected):
    assert attn.resolve_implementation("auto", dtype, seq, platform, devices) == expected
    assert attn.resolve_implementation("xla", dtype, seq, platform, devices) == "xla"


@pytest.mark.parametrize("change, message", [
    (dict(implementation="flash"), "implementation: expected one of"),
    (dict(implementation="cudnn"), "runs on gpu only"),
    (dict(k=np.zeros((2, 40, 3, 8), np.float32)), "kv_heads dividing 4"),
    (dict(v=np.zeros((2, 40, 2, 8), np.float16)), "one float dtype"),
    (dict(padding_mask=np.ones((2, 39), bool)), "padding_mask: expected shape (2, 40)"),
    (dict(segment_ids=np.ones((40,), np.int32)), "segment_ids: expected shape"),
    (dict(causal=False, sliding_window=4), "sliding_window: expected a positive integer"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(block_size=0), "block_size"),
])
def test_bad_inputs_name_the_argument(change, message):
    q, k, v, _ = random_case(0)
    arguments = {**dict(q=q, k=k, v=v), **change}
    arrays = {key: jnp.asarray(arguments.pop(key)) for key in ("q", "k", "v")}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attn.attention(**arrays, **arguments)


def temp_bytes_forward_backward(implementation, seq):
    """XLA temp of out + (dq, dk, dv) at Llama-3.2-1B's attention shape, batch 1, bfloat16."""
    def forward_backward(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attn.attention(
            q, k, v, implementation=implementation), q, k, v)
        return out, vjp(d_out)

    q = jax.ShapeDtypeStruct((1, seq, 32, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, seq, 8, 64), jnp.bfloat16)
    compiled = jax.jit(forward_backward).lower(q, kv, kv, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_with_seq():
    blockwise = [temp_bytes_forward_backward("blockwise", seq) for seq in (4096, 8192)]
    dense = [temp_bytes_forward_backward("xla", seq) for seq in (4096, 8192)]
    assert blockwise[1] / blockwise[0] < 2.5, blockwise
    assert dense[1] / dense[0] > 3.5, dense  # the [b, n, l, l] scores: quadratic
    assert blockwise[0] < dense[0] / 10, (blockwise, dense)
