"""Mistral: the Llama decoder with a sliding attention window on every layer.

The window comes from `config.sliding_window` (see llama.layer_sliding_window); nothing
else differs, so the class only names the architecture.
"""

from __future__ import annotations

from jaxmm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
