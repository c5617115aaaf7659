"""HF `architectures[0]` -> model class.

Imports are lazy so one model's dependencies never block another.
"""

from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("jaxmm.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("jaxmm.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("jaxmm.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("jaxmm.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("jaxmm.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3_5ForCausalLM": ("jaxmm.models.qwen3_5", "Qwen3_5ForCausalLM"),
    "Qwen3_5ForConditionalGeneration": (
        "jaxmm.models.qwen3_5",
        "Qwen3_5ForConditionalGeneration",
    ),
    "Qwen3_5MoeForCausalLM": ("jaxmm.models.qwen3_5_moe", "Qwen3_5MoeForCausalLM"),
    "Qwen3_5MoeForConditionalGeneration": (
        "jaxmm.models.qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
    ),
    "MistralForCausalLM": ("jaxmm.models.mistral", "MistralForCausalLM"),
    "LlavaForConditionalGeneration": ("jaxmm.models.llava", "LlavaForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": (
        "jaxmm.models.llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
    ),
    "Qwen2VLForConditionalGeneration": ("jaxmm.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": (
        "jaxmm.models.qwen2_vl",
        "Qwen2_5_VLForConditionalGeneration",
    ),
    "Qwen3VLForConditionalGeneration": ("jaxmm.models.qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "Qwen3VLMoeForConditionalGeneration": (
        "jaxmm.models.qwen3_vl_moe",
        "Qwen3VLMoeForConditionalGeneration",
    ),
    "Gemma3ForCausalLM": ("jaxmm.models.gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("jaxmm.models.gemma3", "Gemma3ForConditionalGeneration"),
    "Gemma4ForCausalLM": ("jaxmm.models.gemma4", "Gemma4ForCausalLM"),
    "Gemma4ForConditionalGeneration": ("jaxmm.models.gemma4", "Gemma4ForConditionalGeneration"),
    "WhisperForConditionalGeneration": ("jaxmm.models.whisper", "WhisperForConditionalGeneration"),
    "Qwen2AudioForConditionalGeneration": (
        "jaxmm.models.qwen2_audio",
        "Qwen2AudioForConditionalGeneration",
    ),
    "VoxtralForConditionalGeneration": ("jaxmm.models.voxtral", "VoxtralForConditionalGeneration"),
    "Phi4MultimodalForCausalLM": ("jaxmm.models.phi4_multimodal", "Phi4MultimodalForCausalLM"),
    "Qwen2_5OmniThinkerForConditionalGeneration": (
        "jaxmm.models.qwen2_5_omni",
        "Qwen2_5OmniThinkerForConditionalGeneration",
    ),
    "Qwen2_5OmniForConditionalGeneration": (
        "jaxmm.models.qwen2_5_omni",
        "Qwen2_5OmniForConditionalGeneration",
    ),
    "MiniCPMV4_6ForConditionalGeneration": (
        "jaxmm.models.minicpmv",
        "MiniCPMV4_6ForConditionalGeneration",
    ),
    "Qwen3OmniMoeThinkerForConditionalGeneration": (
        "jaxmm.models.qwen3_omni_moe",
        "Qwen3OmniMoeThinkerForConditionalGeneration",
    ),
    "Qwen3OmniMoeForConditionalGeneration": (
        "jaxmm.models.qwen3_omni_moe",
        "Qwen3OmniMoeForConditionalGeneration",
    ),
    # encoder-only pooling (embedding) models: served by the PoolingRunner, not the LLMEngine
    "BertModel": ("jaxmm.models.bert", "BertModel"),
    "RobertaModel": ("jaxmm.models.bert", "RobertaModel"),
    "XLMRobertaModel": ("jaxmm.models.bert", "XLMRobertaModel"),
}
POOLING_ARCHITECTURES = frozenset({"BertModel", "RobertaModel", "XLMRobertaModel"})


def register(arch: str, module: str, cls: str) -> None:
    _MODELS[arch] = (module, cls)


def is_pooling_architecture(arch: str | None) -> bool:
    """Whether `arch` (HF `architectures[0]`) is an embedding model rather than a generator."""
    return arch in POOLING_ARCHITECTURES


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(hf_config):
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError(
            "the checkpoint's config.json names no `architectures`; supported: "
            + ", ".join(supported_architectures())
        )
    arch = archs[0]
    if arch not in _MODELS:
        raise ValueError(
            f"architecture {arch!r} is not supported by jaxmm; supported: "
            + ", ".join(supported_architectures())
        )
    module, cls = _MODELS[arch]
    return getattr(importlib.import_module(module), cls)
