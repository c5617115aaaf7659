"""GGUF checkpoints (llama.cpp's single-file format) -> HF config, tokenizer and tensors.

A GGUF file is a header (metadata key/values, then one info record per tensor: name, dims,
GGML type, offset) followed by the aligned tensor data. Loading one goes:

1. `_read_header` parses the header into plain Python values and memory-maps the file; no
   tensor bytes are read yet.
2. `_hf_config` rebuilds the keyword arguments of a transformers config class from the
   `{arch}.*` metadata (llama.cpp's key names) and turns them into the `TextConfig`
   hf_config.py builds without torch (that class imports it), or into that class
   where hf_config cannot vouch for them. `_hf_tokenizer` hands the `tokenizer.*` metadata to
   transformers' GGUF tokenizer converter; the chat template is `tokenizer.chat_template`.
3. `GGUFCheckpoint.tensors` streams `(hf_key, array)` one tensor at a time: rename by the key
   map below, dequantize (`dequant.py`), and undo the rotary row permutation llama.cpp's
   converter applies to llama's q/k projections, so every array is in HF layout. A MoE
   layer's stacked experts (`ffn_{gate,up,down}_exps`, (E, out, in)) come out as the
   per-expert tensors `save_pretrained` writes (`mlp.experts.{e}.gate_proj.weight`), which
   the model's expert hook (experts.py) stacks again in jaxmm's layout.

Orientation: GGUF lists dims fastest-first (`ne`), so a weight of HF shape `(out, in)` is stored
with `ne = [in, out]` and rows of `in` values -- reversing `ne` gives the HF shape directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import struct
from collections.abc import Iterator
from math import prod
from typing import Any

import numpy as np
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from jaxmm.weights.hf_config import text_config_from_dict

from .dequant import SUPPORTED_TYPES, dequantize, supported_names

__all__ = [
    "SUPPORTED_TYPES",
    "GGUFCheckpoint",
    "dequantize",
    "find_gguf",
    "load_gguf",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# metadata value types (gguf spec): the fixed-size scalars by their struct (= numpy) type code:
# u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64; 8 = string, 9 = array
_SCALAR = dict(zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIif?Qqd", strict=True))
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


class _Cursor:
    """Little-endian reads from a byte buffer."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("I"), self.scalar("Q")
            if etype in _SCALAR:  # numeric arrays in one go (token types, scores)
                arr = np.frombuffer(self.buf, "<" + _SCALAR[etype], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise ValueError(f"unknown GGUF metadata value type {vtype}")
        return self.scalar(_SCALAR[vtype])


def _read_header(path: str) -> tuple[dict[str, Any], list[_TensorInfo], np.memmap]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    if bytes(cur.buf[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        # a big-endian file reads its version byte-swapped; v1 counted with 32-bit ints
        raise ValueError(
            f"{path}: GGUF version {version} is not supported (need v2/v3, little-endian)"
        )
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ne = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        raw_infos.append((name, ne, cur.scalar("I"), cur.scalar("Q")))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    infos = []
    for name, ne, type_id, offset in raw_infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"GGUF tensor {name!r} has unknown GGML type id {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = prod(ne) // block_size * type_size
        start = data_start + offset
        if start + nbytes > data.size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
        infos.append(_TensorInfo(name, tuple(reversed(ne)), qtype, start, nbytes))
    return metadata, infos, data


# ---------------------------------------------------------------------------------------------
# Architectures and names
# ---------------------------------------------------------------------------------------------

# GGUF `general.architecture` -> (HF model type, its config class, HF architectures name).
# Mistral models come as `llama` (llama.cpp converts them with the llama graph) and load as llama.
_ARCHS = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
# Mixture-of-experts architectures, with whether llama.cpp's graph renormalises the top-k
# router weights (HF `norm_topk_prob`; qwen3moe.cpp passes norm_w=true, qwen2moe.cpp false)
# where the file has no `{arch}.expert_weights_norm`.
_MOE_ARCHS = {"qwen2moe": False, "qwen3moe": True}
# llama.cpp permutes the q/k rows of these into its rotary layout; `_unpermute` undoes it.
_PERMUTED_QK = {"llama", "mistral"}

# `{arch}.<key>` -> HF config field, shared by the dense decoders above
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# and the MoE ones
_MOE_CONFIG_KEYS = {
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",  # qwen2moe
}

# GGUF tensor name -> HF key: `blk.{i}.<module>.{weight,bias}` and a few top-level tensors
_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the MoE router, (E, D)
    # qwen2moe's shared expert and its gate, (1, D) in HF
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# stacked experts (E, out, in) -> the per-expert HF projection
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# tensors with no HF counterpart; `rope_freqs` is folded into the config (`_llama3_rope`)
_SKIPPED = {"rope_freqs.weight"}
_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<module>\w+)\.(?P<param>weight|bias)")


def _hf_name(gguf_name: str) -> str | None:
    m = _NAME.fullmatch(gguf_name)
    if m is None:
        return None
    module, param = m["module"], m["param"]
    if m["layer"] is None:
        return f"{_TOP_LEVEL[module]}.{param}" if module in _TOP_LEVEL else None
    if module not in _LAYER:
        return None
    return f"model.layers.{m['layer']}.{_LAYER[module]}.{param}"


def _is_expert_stack(name: str) -> bool:
    m = _NAME.fullmatch(name)
    return m is not None and m["layer"] is not None and m["module"] in _EXPERTS


def _hf_keys(info: _TensorInfo) -> list[str | None]:
    """The HF keys one GGUF tensor becomes: one, or E for a stack of experts."""
    if _is_expert_stack(info.name):
        m = _NAME.fullmatch(info.name)
        prefix, proj = f"model.layers.{m['layer']}.mlp.experts", _EXPERTS[m["module"]]
        return [f"{prefix}.{e}.{proj}.{m['param']}" for e in range(info.shape[0])]
    return [_hf_name(info.name)]


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (convert_hf_to_gguf.py, LlamaModel.permute).

    HF's rotary pairs dim i with i + H/2 inside each head ("rotate_half"); llama.cpp pairs
    adjacent dims, so its converter interleaves the two halves of every head's rows:
    reshape(N, 2, H/2, ...).swapaxes(1, 2). This is the inverse.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Config and tokenizer
# ---------------------------------------------------------------------------------------------


def _scalar_heads(value: Any, what: str) -> int:
    """Head counts may be per-layer arrays (hybrid models); jaxmm needs them uniform."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF {what} varies per layer ({value}); jaxmm does not support that")
        return int(value[0])
    return int(value)


def _llama3_rope(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Llama 3.1+ files store their rope scaling as the per-frequency divisors llama.cpp
    computed (`rope_freqs`), not as metadata. Recover HF's `llama3` rope parameters by
    recomputing that tensor for Meta's published settings (low/high freq factors 1 and 4,
    8192 original positions) and the largest divisor as the factor; None if it does not match."""
    factor = float(rope_freqs.max())
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wavelen = params["original_max_position_embeddings"] / params["low_freq_factor"]
    high_wavelen = params["original_max_position_embeddings"] / params["high_freq_factor"]
    smooth = (params["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(
        wavelen < high_wavelen,
        1.0,
        np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if expected.shape == rope_freqs.shape and np.allclose(expected, rope_freqs, rtol=1e-4):
        return params
    return None


def _hf_config(metadata: dict[str, Any], infos: dict[str, _TensorInfo], data: np.ndarray) -> Any:
    """The HF config of this file: `_config_kwargs` given to the config class `_ARCHS` names,
    as hf_config's `TextConfig` (same values, no torch import) where it can vouch for them."""
    model_type, config_class, _ = _ARCHS[metadata["general.architecture"]]
    kwargs = _config_kwargs(metadata, infos, data)
    config = text_config_from_dict({"model_type": model_type, **kwargs})
    return config if config is not None else getattr(transformers, config_class)(**kwargs)


def _config_kwargs(
    metadata: dict[str, Any], infos: dict[str, _TensorInfo], data: np.ndarray
) -> dict[str, Any]:
    """The keyword arguments of the transformers config class for this file."""
    arch = metadata["general.architecture"]
    kwargs: dict[str, Any] = {"architectures": [_ARCHS[arch][2]]}
    for key, field in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in metadata:
            kwargs[field] = metadata[f"{arch}.{key}"]
    for field in ("num_attention_heads", "num_key_value_heads"):
        if field in kwargs:
            kwargs[field] = _scalar_heads(kwargs[field], field)
    if "head_dim" not in kwargs and f"{arch}.rope.dimension_count" in metadata and arch == "llama":
        kwargs["head_dim"] = metadata[f"{arch}.rope.dimension_count"]  # full rotary in llama
    if "vocab_size" not in kwargs:
        kwargs["vocab_size"] = infos["token_embd.weight"].shape[0]
    for field, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in metadata:
            kwargs[f"{field}_token_id"] = metadata[f"tokenizer.ggml.{key}_token_id"]
    kwargs["tie_word_embeddings"] = "output.weight" not in infos
    if arch in ("llama", "mistral"):
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in infos
    if arch == "qwen2moe":  # Qwen2MoeConfig's name for the q/k/v bias
        kwargs["qkv_bias"] = "blk.0.attn_q.bias" in infos
    if arch in _MOE_ARCHS:
        for key, field in _MOE_CONFIG_KEYS.items():
            if f"{arch}.{key}" in metadata:
                kwargs[field] = metadata[f"{arch}.{key}"]
        kwargs["norm_topk_prob"] = bool(
            metadata.get(f"{arch}.expert_weights_norm", _MOE_ARCHS[arch])
        )
        # llama.cpp's graphs make every layer sparse; a layer without a router is a dense MLP
        # (HF `mlp_only_layers`), whatever wrote the file
        kwargs["decoder_sparse_step"] = 1
        kwargs["mlp_only_layers"] = [
            i
            for i in range(kwargs["num_hidden_layers"])
            if f"blk.{i}.ffn_gate_inp.weight" not in infos
        ]

    theta = float(kwargs.get("rope_theta", 10000.0))
    head_dim = kwargs.get("head_dim") or kwargs["hidden_size"] // kwargs["num_attention_heads"]
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        kwargs["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(metadata[f"{arch}.rope.scaling.factor"]),
        }
    elif scaling == "yarn":
        kwargs["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(metadata[f"{arch}.rope.scaling.factor"]),
            "original_max_position_embeddings": int(
                metadata[f"{arch}.rope.scaling.original_context_length"]
            ),
        }
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling type {scaling!r} is not supported by jaxmm")
    if "rope_freqs.weight" in infos:
        info = infos["rope_freqs.weight"]
        freqs = dequantize(data[info.offset : info.offset + info.nbytes], info.qtype, info.shape)
        params = _llama3_rope(freqs, theta, head_dim)
        if params is None:
            raise ValueError("GGUF rope_freqs tensor does not match llama3 rope scaling")
        kwargs["rope_scaling"] = params
    return kwargs


def _hf_tokenizer(path: str, metadata: dict[str, Any]) -> transformers.PreTrainedTokenizerFast:
    """transformers' GGUF tokenizer converter: byte-level BPE (`gpt2`), sentencepiece (`llama`)
    and the rest it knows, with control tokens as special tokens, the split regex named by
    `tokenizer.ggml.pre`, and `chat_template`/`add_bos_token` in the tokenizer's config.

    Its `get_gguf_tokenizer(path)` reads the file again with transformers' GGUF reader, which
    imports torch; `_gguf_tokenizer_inputs` gives the same from the metadata read here where it
    can vouch for it. The converter itself imports no torch."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers < 5: only the public entry point
        directory, name = os.path.split(os.path.abspath(path))
        return transformers.PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name)
    inputs = _gguf_tokenizer_inputs(metadata)
    arch, tokenizer_dict, tokenizer_config = inputs or get_gguf_tokenizer(path)
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, **tokenizer_config, **extra
    )


# `_gguf_tokenizer_inputs` mirrors `get_gguf_tokenizer` of these transformers versions
# (major.minor; it has changed between 5.x releases) for these `tokenizer.ggml.model`s (its
# other rules concern gemma4 files). Another version takes transformers' route until checked:
# a release can change its reader or rules and keep the names imported here. (5.24 left
# `transformers.integrations.gguf` byte for byte as 5.23 had it.)
_TOKENIZER_INPUTS_VERSIONS = {"5.23", "5.24"}
_TOKENIZER_MODELS = {"gpt2", "llama"}
_SPECIAL_TOKEN_IDS = {  # tokenizer argument -> `tokenizer.ggml.<key>` of its id
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _gguf_tokenizer_inputs(metadata: dict[str, Any]) -> tuple[str, dict, dict] | None:
    """What transformers' `get_gguf_tokenizer` returns -- (architecture, tokenizer dict,
    tokenizer config) -- from this file's metadata, renamed by its `GGUF_TOKENIZER_MAPPING`;
    None where it might differ. tests/weights/test_gguf.py compares the two."""
    model = metadata.get("tokenizer.ggml.model")
    version = ".".join(transformers.__version__.split(".")[:2])
    if model not in _TOKENIZER_MODELS or version not in _TOKENIZER_INPUTS_VERSIONS:
        return None
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    tokenizer, tokenizer_config = (
        {
            name: metadata[f"tokenizer.{key}"]
            for key, name in GGUF_TOKENIZER_MAPPING[group].items()
            if f"tokenizer.{key}" in metadata
        }
        for group in ("tokenizer", "tokenizer_config")
    )
    # `_read_header` replaces bytes that are not UTF-8, where transformers' reader raises
    if any("\ufffd" in s for key in ("tokens", "merges") for s in tokenizer.get(key, ())):
        return None
    if model == "llama":  # older files have no flag; llama.cpp adds BOS to sentencepiece then
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return metadata["general.architecture"], tokenizer, tokenizer_config


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GGUFCheckpoint:
    hf_config: Any  # hf_config.TextConfig, or transformers' config class (see `_hf_config`)
    tokenizer: transformers.PreTrainedTokenizerFast
    eos_token_ids: list[int]
    path: str
    architecture: str  # GGUF `general.architecture`, e.g. "llama"
    _infos: list[_TensorInfo] = dataclasses.field(repr=False)
    _data: np.ndarray = dataclasses.field(repr=False)  # the memory-mapped file

    def keys(self) -> list[str]:
        """The HF keys `tensors` yields, in file order."""
        return [key for info in self._infos if info.name not in _SKIPPED for key in _hf_keys(info)]

    def tensors(self, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
        """Stream (HF key, array) pairs in HF names and orientation, e.g.
        `model.layers.0.self_attn.q_proj.weight` of shape (out, in): each tensor is dequantized
        to float32, un-permuted where llama.cpp permuted it, then cast to `dtype`; a stack of
        experts yields one (out, in) array per expert. Only one tensor's float32 copy is alive
        at a time."""
        cfg = self.hf_config
        unpermute = self.architecture in _PERMUTED_QK
        for info in self._infos:
            if info.name in _SKIPPED:
                continue
            raw = self._data[info.offset : info.offset + info.nbytes]
            w = dequantize(raw, info.qtype, info.shape)
            if unpermute and ".attn_q." in info.name:
                w = _unpermute(w, cfg.num_attention_heads)
            elif unpermute and ".attn_k." in info.name:
                w = _unpermute(w, cfg.num_key_value_heads)
            if _is_expert_stack(info.name):  # (E, out, in): one (out, in) per expert
                for key, expert in zip(_hf_keys(info), w, strict=True):
                    yield key, expert.astype(dtype, copy=False)
            elif info.name.endswith(".ffn_gate_inp_shexp.weight"):
                # HF's Linear(D, 1) weight; llama.cpp reads it as a vector, files hold (D,)
                yield _hf_name(info.name), w.reshape(1, -1).astype(dtype, copy=False)
            else:
                yield _hf_name(info.name), w.astype(dtype, copy=False)


def find_gguf(path: str | os.PathLike) -> str | None:
    """The GGUF file `path` names: the file itself, or the only `*.gguf` in a directory.
    None if there is none; ValueError if a directory holds several (e.g. several quantizations,
    or a split model, which jaxmm does not read)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(found)}); pass one of them")
    return os.path.join(path, found[0]) if found else None


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF checkpoint (a `.gguf` file, or a directory holding exactly one): config and
    tokenizer now, tensors lazily through `GGUFCheckpoint.tensors`."""
    file = find_gguf(path)
    if file is None:
        raise FileNotFoundError(f"no .gguf file at {os.fspath(path)}")
    metadata, infos, data = _read_header(file)
    arch = metadata.get("general.architecture")
    experts = [i.name for i in infos if _is_expert_stack(i.name)]
    if arch not in _ARCHS or (experts and arch not in _MOE_ARCHS):
        # a MoE file of an architecture jaxmm reads dense: Mixtral, which llama.cpp converts
        # as `llama` with experts
        moe = f" with mixture-of-experts tensors ({experts[0]}, ...)" if experts else ""
        raise ValueError(
            f"GGUF architecture {arch!r}{moe} is not supported by jaxmm; supported: "
            f"{sorted(_ARCHS)}, of them mixture-of-experts: {sorted(_MOE_ARCHS)}"
        )
    unknown = [i.name for i in infos if i.name not in _SKIPPED and None in _hf_keys(i)]
    if unknown:
        raise ValueError(f"GGUF tensors with no HF counterpart in {arch}: {unknown}")
    for info in infos:
        if info.qtype not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF tensor {info.name!r} has quantization type {info.qtype.name}, which jaxmm "
                f"does not support; supported: {supported_names()}"
            )
    hf_config = _hf_config(metadata, {i.name: i for i in infos}, data)
    tokenizer = _hf_tokenizer(file, metadata)
    # end of generation: eos, and llama 3's end-of-turn / end-of-message tokens where given
    eos = [
        metadata[f"tokenizer.ggml.{key}"]
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        if f"tokenizer.ggml.{key}" in metadata
    ]
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    return GGUFCheckpoint(
        hf_config=hf_config,
        tokenizer=tokenizer,
        eos_token_ids=list(dict.fromkeys(eos)),
        path=file,
        architecture=arch,
        _infos=infos,
        _data=data,
    )
