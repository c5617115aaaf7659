"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 decoder with a MoE feed-forward.

Attention is Qwen3's (q/k RMSNorm per head). Each layer's `mlp` is the MoE block of
layers/moe.py (router `gate`, stacked `experts`), or a dense gated MLP of
`intermediate_size` where `mlp_only_layers` / `decoder_sparse_step` say so, as in
transformers' Qwen3MoeDecoderLayer. Expert weights load from per-expert keys
(`mlp.experts.{e}.gate_proj.weight`, what `save_pretrained` and the released checkpoints
hold) or from the fused `mlp.experts.gate_up_proj` / `down_proj` stacks (weights/experts.py).

The grouped-matmul implementation is `auto` (layers/moe.py `default_impl`); the environment
variable JAXMM_MOE_IMPL (dense, ragged, capacity, gather, pallas, mosaic_gpu) overrides it.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from jaxmm.layers.moe import SparseMoeBlock, layer_mlp, num_experts
from jaxmm.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model
from jaxmm.weights.experts import ExpertStacker


def moe_impl() -> str:
    return os.environ.get("JAXMM_MOE_IMPL", "auto")


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        super().__init__(
            config, layer_idx, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        # the MoE block or a dense MLP per layer (built abstractly by the runner: the dense
        # MLP the parent made costs no memory)
        self.mlp = layer_mlp(config, layer_idx, dtype=dtype, impl=moe_impl(), rngs=rngs)

    def __call__(self, x, cos, sin, kv_pages, md):
        h, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, kv_pages, md)
        x = x + h
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoeBlock):
            # the bucket's padding tokens route nowhere (decode reads only real tokens' experts)
            h = self.mlp(h, valid=jnp.arange(x.shape[0]) < md.cu_q_lens[-1])
        else:
            h = self.mlp(h)
        return x + h, kv_pages


class Qwen3MoeModel(Qwen3Model):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    model_cls = Qwen3MoeModel

    def hf_tensor_converter(self) -> ExpertStacker:
        """Stacks per-expert tensors (or splits fused ones) as the loader streams them."""
        return ExpertStacker(num_experts(self.config))
