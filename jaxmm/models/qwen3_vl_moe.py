"""Qwen3-VL-MoE: Qwen3-VL (`qwen3_vl.py`) with mixture-of-experts feed-forward layers.

The vision tower, DeepStack, interleaved M-RoPE and the multimodal contract are Qwen3-VL's.
Each decoder layer's MLP is the MoE block of `layers/moe.py` where the config makes it
sparse (`mlp_only_layers`, `decoder_sparse_step`), else a dense gated MLP of
`intermediate_size`. The router always renormalises its top-k weights (transformers'
`Qwen3VLMoeTextTopKRouter` has no `norm_topk_prob` switch).

Weights: the experts are stored fused, `mlp.experts.gate_up_proj` (gate first, then up)
and `mlp.experts.down_proj`, in one of two layouts told apart by shape: the released
checkpoints' (E, D, 2F) and (E, F, D), or transformers 5's own, which its `save_pretrained`
writes: (E, 2F, D) and (E, D, F) (transposed on load by its conversion mapping). Where
D == 2F the released layout is assumed. `convert_hf_tensor` splits gate from up into the
block's (E, D, F) stacks.
"""

from __future__ import annotations

import re

import numpy as np

from jaxmm.layers.moe import SparseMoeBlock, is_sparse_layer, num_experts
from jaxmm.models.qwen3 import Qwen3DecoderLayer
from jaxmm.models.qwen3_moe import Qwen3MoeDecoderLayer
from jaxmm.models.qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLTextModel

_GATE_UP = re.compile(r"mlp\.experts\.gate_up_proj$")
_DOWN = re.compile(r"mlp\.experts\.down_proj$")


class Qwen3VLMoeDecoderLayer(Qwen3DecoderLayer):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        super().__init__(
            config, layer_idx, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        if is_sparse_layer(config, layer_idx):
            self.mlp = SparseMoeBlock(
                config.hidden_size,
                config.moe_intermediate_size,
                num_experts(config),
                config.num_experts_per_tok,
                config.hidden_act,
                norm_topk_prob=True,
                dtype=dtype,
                rngs=rngs,
            )

    # the bucket's padding tokens route nowhere, as in Qwen3-MoE
    __call__ = Qwen3MoeDecoderLayer.__call__


class Qwen3VLMoeTextModel(Qwen3VLTextModel):
    layer_cls = Qwen3VLMoeDecoderLayer


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    model_cls = Qwen3VLMoeTextModel

    def convert_hf_tensor(self, key: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Fused expert tensors -> the MoE block's gate_proj / up_proj (E, D, F) and
        down_proj (E, F, D); every other tensor as it is."""
        D, F = self.config.hidden_size, self.config.moe_intermediate_size
        if _GATE_UP.search(key):
            if array.shape[1:] != (D, 2 * F):  # transformers' in-memory (E, 2F, D)
                array = np.swapaxes(array, 1, 2)
            stem = key[: -len("gate_up_proj")]
            return [(stem + "gate_proj", array[..., :F]), (stem + "up_proj", array[..., F:])]
        if _DOWN.search(key) and array.shape[1:] != (F, D):
            return [(key, np.swapaxes(array, 1, 2))]
        return [(key, array)]
