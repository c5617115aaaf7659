"""Read a text checkpoint's config.json and pick its tokenizer class without importing torch.

Why: `transformers.AutoConfig` and `AutoTokenizer` import `transformers.configuration_utils`,
which imports `modeling_rope_utils`, which imports torch whenever torch is installed: about
13 s of a 50 s start-up on the GPU host, for an engine that never runs torch. transformers
has no switch for it, so for the text architectures jaxmm runs natively:

1. `load_config` reads config.json with `json`, fills the defaults of transformers' config
   class for the keys it lacks (`DEFAULTS`, from transformers 5's configuration_<type>.py)
   and makes the changes transformers makes on load: `rope_scaling` and `rope_theta` fold
   into `rope_parameters` (`rope_scaling` reads it back, `rope_theta` is gone); the legacy
   `torch_dtype` becomes `dtype` (kept as its name, which is all jaxmm reads); a null
   `num_key_value_heads` is `num_attention_heads`; llama and mistral derive `head_dim`;
   qwen2/qwen3 drop `sliding_window` unless `use_sliding_window` and derive `layer_types`.
2. `tokenizer_class` resolves the class AutoTokenizer would pick, from tokenizer_config.json
   and the model type, with `getattr(transformers, name)` (transformers' lazy module then
   imports only that tokenizer's module).

`text_config_from_dict` does step 1 for a dict built elsewhere (a GGUF file's metadata, as
weights/gguf.py does).

Whatever these cannot vouch for -- another model type (multimodal, encoder and audio configs
are composite), remote code, a quantization config, a rope or layer type not listed here,
a tokenizer whose choice depends on more than these files -- goes to `AutoConfig` /
`AutoTokenizer` as before. tests/weights/test_hf_config.py compares both paths field by field.
"""

from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

# -- config.json --------------------------------------------------------------------------------

_COMMON = dict(
    architectures=None,
    dtype=None,
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters=None,
    pad_token_id=None,
)
_QWEN2 = dict(
    vocab_size=151936,
    intermediate_size=22016,
    num_key_value_heads=32,
    max_position_embeddings=32768,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
    layer_types=None,
    bos_token_id=None,
    eos_token_id=None,
)
# model_type -> transformers' default for each field a text model's config declares. A field
# the class does not declare stays absent (qwen2 has no `head_dim` nor `attention_bias`), so
# `getattr(config, key, default)` gives jaxmm's own default, as with AutoConfig.
DEFAULTS: dict[str, dict] = {
    "llama": {
        **_COMMON,
        "vocab_size": 32000,
        "intermediate_size": 11008,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "mistral": {
        **_COMMON,
        "vocab_size": 32000,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2": {**_COMMON, **_QWEN2},
    "qwen3": {**_COMMON, **_QWEN2, "head_dim": 128, "attention_bias": False},
}
# The types those classes declare: huggingface_hub's strict dataclasses refuse others (an int
# for a float, a null for a plain int), so such a config is left to transformers to refuse.
_INT, _OPT_INT, _BOOL = (int,), (int, type(None)), (bool,)
_TYPES = {
    "vocab_size": _INT,
    "hidden_size": _INT,
    "intermediate_size": _INT,
    "num_hidden_layers": _INT,
    "num_attention_heads": _INT,
    "num_key_value_heads": _OPT_INT,
    "head_dim": _OPT_INT,
    "hidden_act": (str,),
    "max_position_embeddings": _INT,
    "rms_norm_eps": (float,),
    "tie_word_embeddings": _BOOL,
    "attention_bias": _BOOL,
    "mlp_bias": _BOOL,
    "use_sliding_window": _BOOL,
    "sliding_window": _OPT_INT,
    "max_window_layers": _INT,
    "pad_token_id": _OPT_INT,
    "bos_token_id": _OPT_INT,
    "eos_token_id": (int, list, type(None)),
}
_NOT_NULL = {"mistral": {"num_key_value_heads"}, "qwen3": {"head_dim"}}
_UNVOUCHED_KEYS = frozenset({"auto_map", "quantization_config", "text_config", "per_layer_config"})
_LAYER_TYPES = ("full_attention", "sliding_attention")
# rope_type -> keys its parameters need (transformers' _validate_<type>_rope_parameters)
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


class TextConfig(SimpleNamespace):
    """A text model's config as attributes; a missing one raises AttributeError, as with
    transformers' configs, so `getattr(config, key, default)` behaves the same."""


def load_config(model_dir: str):
    """The HF config of the checkpoint directory `model_dir`: a `TextConfig` for the model
    types in `DEFAULTS`, else (or when in doubt) `AutoConfig.from_pretrained`'s."""
    raw = _read_json(os.path.join(model_dir, "config.json"))  # None: transformers says why
    config = None if raw is None else text_config_from_dict(raw)
    if config is None:
        from transformers import AutoConfig

        return served_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return config


def served_config(config):
    """The config of the part of a checkpoint that jaxmm serves: a full Qwen2.5-Omni or
    Qwen3-Omni-MoE (thinker + speech output) is served as its thinker (text out), so the
    engine sees the thinker's config, under the full model's `architectures` (its registry
    entry)."""
    thinker = getattr(config, "thinker_config", None)
    omni = ("qwen2_5_omni", "qwen3_omni_moe")
    if getattr(config, "model_type", None) in omni and thinker is not None:
        thinker.architectures = list(getattr(config, "architectures", None) or [])
        return thinker
    return config


def text_config_from_dict(values: dict) -> TextConfig | None:
    """The config transformers' class for `values["model_type"]` builds from `values` (the keys
    of a config.json, or that class's keyword arguments), with the defaults and changes of
    `load_config`; None where it cannot vouch for it: then build transformers' class."""
    values = _text_config_values(values)
    return None if values is None else TextConfig(**values)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _text_config_values(raw: dict) -> dict | None:
    """config.json -> attribute values as transformers would set them; None: not vouched."""
    model_type = raw.get("model_type")
    if (
        not isinstance(model_type, str)
        or model_type not in DEFAULTS
        or _UNVOUCHED_KEYS & raw.keys()
    ):
        return None
    v = {**DEFAULTS[model_type], **raw}
    declared = DEFAULTS[model_type].keys() & _TYPES.keys()
    if any(type(v[k]) not in _TYPES[k] for k in declared):
        return None
    if any(v[k] is None for k in _NOT_NULL.get(model_type, ())):
        return None
    if model_type == "llama" and v["hidden_size"] % v["num_attention_heads"]:
        return None  # LlamaConfig refuses it
    torch_dtype = v.pop("torch_dtype", None)  # the pre-5 name of `dtype`
    v["dtype"] = v["torch_dtype"] = v["dtype"] if v["dtype"] is not None else torch_dtype
    if v["num_key_value_heads"] is None:
        v["num_key_value_heads"] = v["num_attention_heads"]
    if model_type in ("llama", "mistral") and v["head_dim"] is None:
        v["head_dim"] = v["hidden_size"] // v["num_attention_heads"]
    if model_type in ("qwen2", "qwen3"):
        if not v["use_sliding_window"]:
            v["sliding_window"] = None
        if v["layer_types"] is None:
            v["layer_types"] = [
                "sliding_attention"
                if v["sliding_window"] is not None and i >= v["max_window_layers"]
                else "full_attention"
                for i in range(v["num_hidden_layers"])
            ]
    layer_types = v.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list)
        or len(layer_types) != v["num_hidden_layers"]
        or not all(t in _LAYER_TYPES for t in layer_types)
    ):
        return None
    rope = _rope_parameters(v)
    if rope is None:
        return None
    v["rope_parameters"] = v["rope_scaling"] = rope
    return v


def _rope_parameters(v: dict) -> dict | None:
    """Pops `rope_scaling`/`rope_theta` from `v` and returns the standardized rope_parameters."""
    theta = v.pop("rope_theta", 10000.0)
    params = v.pop("rope_scaling", None) or v["rope_parameters"] or {}
    if not isinstance(params, dict) or "partial_rotary_factor" in v.keys() | params.keys():
        return None
    if any(isinstance(p, dict) for p in params.values()):  # one dict per layer type
        return None
    params = dict(params)
    params.setdefault("rope_theta", theta)
    rope_type = params.setdefault("rope_type", params.get("type", "default"))
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", v["max_position_embeddings"])
    required = _ROPE_KEYS.get(rope_type) if isinstance(rope_type, str) else None
    if required is None or not required <= params.keys():
        return None
    return params


# -- tokenizer ----------------------------------------------------------------------------------

# AutoTokenizer (transformers 5) loads tokenizer_config.json's `tokenizer_class`, except where
# it registers a class of its own for the model type (TOKENIZER_MAPPING_NAMES) and the two
# differ: then a backend registration wins, and so does the registered class for model types
# whose declared class it distrusts (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS). Its rules for
# named Hub repos (MODEL_IDS_TO_TOKENIZERS_BACKEND) concern LlamaTokenizer checkpoints, left to
# it below, or other model types.
_REGISTERED_TOKENIZER = {
    "llama": None,
    "mistral": "TokenizersBackend",  # without mistral_common
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
}
_DECLARED_CLASS_DISTRUSTED = frozenset({"qwen2"})
_BACKENDS = frozenset({"TokenizersBackend", "PreTrainedTokenizer", "PythonBackend"})
# Importing these imports neither torch nor transformers.configuration_utils (tested).
LIGHT_TOKENIZERS = frozenset({"TokenizersBackend", "GPT2Tokenizer", "Qwen2Tokenizer"})


def tokenizer_class_name(path: str) -> str | None:
    """The class AutoTokenizer would load from directory `path`, when it is one of
    `LIGHT_TOKENIZERS` and these JSON files decide it; else None."""
    tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
    config = _read_json(os.path.join(path, "config.json"))
    if tokenizer_config is None or config is None:
        return None
    model_type = config.get("model_type")
    declared = tokenizer_config.get("tokenizer_class")
    if (
        not isinstance(model_type, str)
        or model_type not in _REGISTERED_TOKENIZER
        or not isinstance(declared, str)
        or "auto_map" in tokenizer_config
        or "auto_map" in config
    ):
        return None
    name = declared.removesuffix("Fast")
    # LlamaTokenizer: AutoTokenizer looks into tokenizer.json (byte-level ones load as
    # TokenizersBackend); with mistral_common it probes for Mistral's own tokenizer files
    if name == "LlamaTokenizer" or (
        model_type == "mistral" and importlib.util.find_spec("mistral_common") is not None
    ):
        return None
    registered = _REGISTERED_TOKENIZER[model_type]
    if registered is not None and registered != name:
        if registered in _BACKENDS:
            name = "TokenizersBackend"
        elif model_type in _DECLARED_CLASS_DISTRUSTED:
            name = registered
    if name in _BACKENDS:
        name = "TokenizersBackend"
    return name if name in LIGHT_TOKENIZERS else None


def tokenizer_class(path: str) -> type | None:
    """The tokenizer class for directory `path` (see `tokenizer_class_name`), or None."""
    name = tokenizer_class_name(path)
    if name is None:
        return None
    import transformers

    return getattr(transformers, name, None)
