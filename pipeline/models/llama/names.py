"""The Llama family's Hugging Face tensor names: the one place that maps them to our parameter
paths (``pipeline.models.llama.model``), with the layout change between them."""

from __future__ import annotations

import re

from pipeline.models.layouts import HEAD_BIAS, HEADS_IN, HEADS_OUT, LINEAR, SAME, NameRow
from pipeline.models.llama.config import LlamaConfig

# Hugging Face name -> (our parameter path, layout); {i} is the layer index. A row applies when
# the model has that parameter (biases for qwen2, q/k norms for qwen3, lm_head when untied).
# Rows are in transformers' order, which is the order of a save (layer by layer).
HF_NAMES: tuple[NameRow, ...] = (
    ("model.embed_tokens.weight", "embedder/embedding_vd", SAME),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/input_norm/scale", SAME),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/q_dnh", HEADS_IN),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/attn/k_dkh", HEADS_IN),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/attn/v_dkh", HEADS_IN),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/{i}/attn/q_bias_nh", HEAD_BIAS),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/{i}/attn/k_bias_kh", HEAD_BIAS),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/{i}/attn/v_bias_kh", HEAD_BIAS),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/{i}/attn/q_norm/scale", SAME),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/{i}/attn/k_norm/scale", SAME),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/o_nhd", HEADS_OUT),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/post_attn_norm/scale", SAME),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/{i}/mlp/gate_df", LINEAR),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/mlp/up_df", LINEAR),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/{i}/mlp/down_fd", LINEAR),
    ("model.norm.weight", "final_norm/scale", SAME),
    ("lm_head.weight", "lm_head_vd", SAME),
)

# The RoPE cache that old Llama checkpoints saved; transformers itself drops it at load time.
_ROPE_CACHE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def ignored_tensor(config: LlamaConfig, name: str) -> bool:
    """True for a stored tensor that loading skips: a RoPE cache, or the head of a model with
    tied embeddings (some tied checkpoints store it; transformers ties over it, and so do we)."""
    return bool(_ROPE_CACHE.fullmatch(name)) or (
        config.tie_word_embeddings and name == "lm_head.weight")
