"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3, one decoder.

``LlamaConfig.model_type`` picks the variant's details:

- ``llama``: grouped-query attention (GQA), RoPE with an optional ``llama3`` frequency scaling.
- ``mistral``: as llama, plus an optional sliding attention window on every layer.
- ``qwen2``: as llama, plus a bias on the q, k and v projections.
- ``qwen3``: as llama, plus an RMSNorm over ``head_dim`` on each query and key head, and a
  ``head_dim`` that need not equal ``hidden_size / num_attention_heads``.

Modules: ``config`` (``LlamaConfig`` <-> config.json), ``model`` (the layers and ``Llama``),
``names`` (the Hugging Face tensor name table). ``pipeline.models.registry`` lists the family.
"""

from pipeline.models.llama.config import ARCHITECTURES, Llama3RopeScaling, LlamaConfig
from pipeline.models.llama.model import Llama, RMSNorm, apply_rope, rope_inverse_frequencies
from pipeline.models.llama.names import HF_NAMES, ignored_tensor

__all__ = [
    "ARCHITECTURES", "HF_NAMES", "Llama", "Llama3RopeScaling", "LlamaConfig", "RMSNorm",
    "apply_rope", "ignored_tensor", "rope_inverse_frequencies",
]
