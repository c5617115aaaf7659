"""Qwen3.5-MoE (Qwen3.5-35B-A3B style): the Qwen3.5 hybrid (`qwen3_5.py`) with MoE layers.

Token mixers, norms, rotary, state slots and the multimodal front end are Qwen3.5's; only the
feed-forward changes. Every decoder layer's `mlp` is the MoE block of `layers/moe.py`, as in
transformers' Qwen3_5MoeSparseMoeBlock (no `mlp_only_layers`, no `decoder_sparse_step`):
- router `gate` (D -> E, no bias): softmax in float32, top-k, always renormalised (the config
  has no `norm_topk_prob`; transformers' router divides by the top-k sum unconditionally);
- E stacked experts of `moe_intermediate_size`;
- a shared expert of `shared_expert_intermediate_size` on every token, scaled by
  sigmoid(`shared_expert_gate`(x)) (a D -> 1 projection) and added to the routed output.
The bucket's padding tokens route to no expert (as in Qwen3-MoE), so a decode step reads
only its real tokens' experts.

Weights: transformers 5.x keeps Qwen3.5-MoE's experts fused and writes them as they are
(`mlp.experts.gate_up_proj` (E, 2F, D), gate first, and `mlp.experts.down_proj` (E, D, F));
per-expert keys (`mlp.experts.{e}.gate_proj.weight`) load too. `weights/experts.py` splits
and stacks them into the block's (E, D, F) / (E, F, D) stacks as they stream by.

The grouped-matmul implementation follows JAXMM_MOE_IMPL (`qwen3_moe.moe_impl`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.moe import SparseMoeBlock, num_experts
from jaxmm.models.qwen3_5 import (
    Qwen3_5DecoderLayer,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextModel,
)
from jaxmm.models.qwen3_moe import moe_impl
from jaxmm.weights.experts import ExpertStacker


class Qwen3_5MoeDecoderLayer(Qwen3_5DecoderLayer):
    def make_mlp(self, config, *, dtype, rngs) -> nnx.Module:
        return SparseMoeBlock(
            config.hidden_size,
            config.moe_intermediate_size,
            num_experts(config),
            config.num_experts_per_tok,
            config.hidden_act,
            norm_topk_prob=True,
            shared_F=config.shared_expert_intermediate_size,
            impl=moe_impl(),
            dtype=dtype,
            rngs=rngs,
        )

    def feed_forward(self, h: jax.Array, md: AttentionMetadata) -> jax.Array:
        # the bucket's padding tokens route nowhere (decode reads only real tokens' experts)
        return self.mlp(h, valid=jnp.arange(h.shape[0]) < md.cu_q_lens[-1])


class Qwen3_5MoeTextModel(Qwen3_5TextModel):
    layer_cls = Qwen3_5MoeDecoderLayer


def _expert_stacker(self) -> ExpertStacker:
    """Splits the fused expert tensors (or stacks per-expert ones) as the loader streams them."""
    return ExpertStacker(num_experts(self.config))


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    model_cls = Qwen3_5MoeTextModel
    hf_tensor_converter = _expert_stacker


class Qwen3_5MoeForConditionalGeneration(Qwen3_5ForConditionalGeneration):
    """Images and video through Qwen3-VL's front end and tower; text through the MoE hybrid."""

    model_cls = Qwen3_5MoeTextModel
    hf_tensor_converter = _expert_stacker
