"""pipeline.hardware: the chips' peaks by device kind, and the FLOP formulas checked against an
independent count (the model's parameter tree) and XLA's cost analysis of the compiled passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline import hardware
from pipeline.models.llama import Llama, LlamaConfig


def test_chip_of_device_kinds_and_mfu():
    kinds = {"TPU v4": "TPU v4", "TPU v5 lite": "TPU v5e", "TPU v5e": "TPU v5e",
             "TPU v5": "TPU v5p", "TPU v5p": "TPU v5p", "TPU v6 lite": "TPU v6e",
             "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A100 80GB PCIe": "A100",
             "NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
             "NVIDIA H200": "H200 SXM", "NVIDIA H200 NVL": "H200 NVL"}
    assert {kind: hardware.chip_of(kind).name for kind in kinds} == kinds
    for unknown in ("cpu", "TPU v4 lite", "TPU v3", "NVIDIA GeForce RTX 4090", "TPU v40", ""):
        assert hardware.chip_of(unknown) is None, unknown
    assert hardware.chip_of(jax.devices()[0].device_kind) is None  # the CPU these tests run on
    assert hardware.mfu(1e9, 1e5, None, 4) is None
    assert hardware.format_mfu(None) == "n/a"
    v4 = hardware.chip_of("TPU v4")
    assert hardware.mfu(3e9, 2e5, v4, 8) == pytest.approx(3e9 * 2e5 / (275e12 * 8))
    assert hardware.format_mfu(hardware.mfu(3e9, 2e5, v4, 8)) == "27.3%"


def test_flops_per_token_match_parameters_and_xla():
    fields = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=384,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    for tied in (True, False):
        # N from the parameters themselves: every matrix but the embedding lookup, and the
        # table once as the head when tied (norm scales are vectors).
        config = LlamaConfig(**fields, tie_word_embeddings=tied)
        params = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
        by_path = {jax.tree_util.keystr(path): leaf.size
                   for path, leaf in jax.tree_util.tree_leaves_with_path(params) if leaf.ndim >= 2}
        lookup = 0 if tied else by_path["['embedder']['embedding_vd'].value"]
        assert hardware.matmul_params(config) == sum(by_path.values()) - lookup

    batch, seq = 2, 64
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq)), jnp.int32)

    def loss(graphdef, params):
        logits = nnx.merge(graphdef, params)(ids).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1)
                        - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    for remat in ("none", "full", "save_dots"):
        graphdef, params = nnx.split(Llama(config, attention="xla", remat=remat,
                                           rngs=nnx.Rngs(0)), nnx.Param)
        compiled = jax.jit(jax.grad(loss, argnums=1), static_argnums=0).lower(
            graphdef, params).compile()
        assert "while" not in compiled.as_text()  # looped layers: XLA counts every layer
        xla = compiled.cost_analysis()["flops"] / (batch * seq)
        # XLA also counts the elementwise work (norms, RoPE, SwiGLU, softmax): ~1-2% here
        want = (hardware.train_flops_per_token(config, seq)
                + hardware.recompute_flops_per_token(config, seq, remat))
        assert xla == pytest.approx(want, rel=0.03), remat
        if remat == "none":
            assert want == 3 * hardware.forward_flops_per_token(config, seq)


def test_utilisation_describes_its_source_or_why_not():
    on_v5p = hardware.Utilisation(2.5e9, "TPU v5", chips=16)
    assert on_v5p.mfu(1e6) == pytest.approx(2.5e9 * 1e6 / (459e12 * 16))
    assert on_v5p.describe() == ("MFU: 2.5e+09 model FLOPs per token (6N + 12LHQT, PaLM appendix "
                                 "B; pipeline/hardware.py) x tokens/s / (16 x TPU v5p at 459 "
                                 "TFLOP/s bf16)")
    on_cpu = hardware.Utilisation(2.5e9, "cpu", chips=1)
    assert on_cpu.mfu(1e6) is None
    assert on_cpu.describe().startswith("MFU: n/a, no peak FLOP/s is known for device kind 'cpu'")
