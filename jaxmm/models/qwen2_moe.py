"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the Qwen2 decoder with a MoE feed-forward.

Attention is Qwen2's (bias on q/k/v, `qkv_bias` in this config). Each layer's `mlp` is the MoE
block of layers/moe.py -- softmax top-k router `gate` (renormalised only with
`norm_topk_prob`, off by default here), stacked `experts`, and a `shared_expert` of
`shared_expert_intermediate_size` scaled by sigmoid(`shared_expert_gate`(x)) -- or a dense
MLP where `mlp_only_layers` / `decoder_sparse_step` say so, as in transformers'
Qwen2MoeDecoderLayer. Experts load from per-expert or fused keys as Qwen3-MoE's do.
"""

from __future__ import annotations

import copy

from jaxmm.models.qwen2 import Qwen2Attention
from jaxmm.models.qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeForCausalLM, Qwen3MoeModel


class Qwen2MoeAttention(Qwen2Attention):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        # Qwen2MoeConfig names the q/k/v bias `qkv_bias` (the attention reads `attention_bias`)
        config = copy.copy(config)
        config.attention_bias = bool(getattr(config, "qkv_bias", True))
        super().__init__(
            config, layer_idx, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )


class Qwen2MoeDecoderLayer(Qwen3MoeDecoderLayer):
    attention_cls = Qwen2MoeAttention


class Qwen2MoeModel(Qwen3MoeModel):
    layer_cls = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    model_cls = Qwen2MoeModel
