"""Convert a CTranslate2 Whisper model (faster-whisper's format) to a Hugging Face folder.

CTranslate2 ships Whisper as `model.bin` (every weight, in its own binary layout),
`config.json` (suppressed token ids, alignment heads), and `tokenizer.json` /
`vocabulary.txt`. `convert_ct2_whisper(src, dst)` turns that folder into one that
`transformers.WhisperForConditionalGeneration.from_pretrained(dst)` and
`WhisperProcessor.from_pretrained(dst)` load, and so into jaxmm's ordinary HF loading path:

1. `read_ct2_model` parses `model.bin` (layout below) into named numpy arrays plus aliases.
2. `ct2_to_hf_state_dict` renames every variable to its HF key (`WHISPER_KEY_MAP`), splits
   the fused q/k/v and k/v projections, dequantizes int8/int16 weights, and fills the
   encoder's sinusoidal positions when the file lacks them. Every non-scalar variable must
   map to an HF key, so a layout this converter does not know fails loudly.
3. `whisper_config` reads the model dimensions off the tensor shapes; the generation config
   takes token ids from the vocabulary and the suppress lists from ct2's `config.json`.
4. The tokenizer (`tokenizer.json` plus the timestamp tokens from `vocabulary.txt`) and a
   `WhisperFeatureExtractor` with the model's mel-bin count are saved next to the weights.

`model.bin` layout (little endian; see CTranslate2's `model_spec.py` and `models/model.cc`):

    u32 binary_version
    if version >= 2:  str spec_name ("WhisperSpec"), u32 spec_revision
    u32 num_variables, then per variable:
        str name, u8 rank, u32 dims[rank],
        version >= 4:  u8 dtype_id, u32 num_bytes      (ids: DTYPES below)
        version < 4:   u8 item_size, u32 num_items     (4: f32, 2: i16, 1: i8)
        raw bytes, C order
    if version >= 3:  u32 num_aliases, then per alias: str alias, str target
    str = u16 length (including a trailing NUL), then the bytes with the NUL

Usage: `python -m jaxmm.weights.ct2_whisper SRC_DIR DST_DIR [--dtype float16]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import WhisperConfig

logger = logging.getLogger(__name__)

# ct2 DataType enum order (include/ctranslate2/types.h). bfloat16 has no numpy dtype: it is
# read as uint16 and widened to float32.
DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_LEGACY_ITEM_SIZES = {4: "float32", 2: "int16", 1: "int8"}
MAX_BINARY_VERSION = 6
# ct2's common_spec.Activation; Whisper uses exact GELU.
_CT2_GELU = 3


# ---------------------------------------------------------------------------------------
# 1. model.bin
# ---------------------------------------------------------------------------------------


@dataclass
class Ct2Model:
    """The contents of a `model.bin`: variables by name (scalars are 0-d arrays)."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        """The stored variable behind `name` (following aliases)."""
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise ValueError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        return name

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) in self.variables

    def get(self, name: str) -> np.ndarray:
        """The variable as stored (after alias resolution)."""
        resolved = self.resolve(name)
        if resolved not in self.variables:
            raise KeyError(f"variable {name!r} not found in model.bin")
        return self.variables[resolved]

    def scalar(self, name: str, default: int | None = None) -> int | None:
        return int(self.get(name)) if name in self else default

    def float_weight(self, name: str) -> np.ndarray:
        """The variable as float32, dequantized with its `<name>_scale` when quantized.

        ct2 quantizes a weight `w` to `round(w * scale)`: int8 with one scale per output row,
        int16 with one scale for the whole tensor.
        """
        value = self.get(name)
        if value.dtype in (np.int8, np.int16):
            scale_name = self.resolve(name) + "_scale"
            if scale_name not in self.variables:
                raise ValueError(f"{name} is {value.dtype} but {scale_name} is missing")
            scale = self.variables[scale_name].astype(np.float32)
            if scale.ndim == 1:
                scale = scale[:, None]
            return value.astype(np.float32) / scale
        return value.astype(np.float32)


class _Reader:
    """Cursor over a memory-mapped model.bin with bounds-checked reads."""

    def __init__(self, path: str):
        self.path = path
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty")
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0

    def take(self, n: int, what: str) -> np.ndarray:
        if self.pos + n > len(self.buf):
            raise ValueError(
                f"{self.path} is truncated: wanted {n} bytes for {what} at offset {self.pos}, "
                f"file has {len(self.buf)}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what).tobytes())[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"{what} length")
        raw = self.take(length, what).tobytes()
        if not raw.endswith(b"\0"):
            raise ValueError(f"{self.path}: {what} at offset {self.pos - length} is not NUL-ended")
        return raw[:-1].decode("utf-8")


def read_ct2_model(path: str) -> Ct2Model:
    """Parse a CTranslate2 `model.bin` (a file, or the folder holding it).

    Arrays are views of a read-only memory map (bfloat16 is widened to float32 copies).
    Raises ValueError for a malformed or truncated file or a newer binary version.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "model.bin")
    r = _Reader(path)
    version = r.unpack("I", "binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ValueError(
            f"{path}: unsupported CTranslate2 binary version {version} "
            f"(this reader knows 1..{MAX_BINARY_VERSION}); is this a CTranslate2 model.bin?"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = r.string("spec name")
        revision = r.unpack("I", "spec revision")

    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I", "variable count")):
        name = r.string("variable name")
        rank = r.unpack("B", f"rank of {name}")
        shape = tuple(r.unpack("I", f"shape of {name}") for _ in range(rank))
        if version >= 4:
            type_id = r.unpack("B", f"dtype of {name}")
            if type_id not in DTYPES:
                raise ValueError(f"{path}: unknown dtype id {type_id} for {name}")
            dtype = DTYPES[type_id]
            num_bytes = r.unpack("I", f"size of {name}")
        else:
            item_size = r.unpack("B", f"item size of {name}")
            if item_size not in _LEGACY_ITEM_SIZES:
                raise ValueError(f"{path}: unknown item size {item_size} for {name}")
            dtype = _LEGACY_ITEM_SIZES[item_size]
            num_bytes = r.unpack("I", f"size of {name}") * item_size
        raw = r.take(num_bytes, f"data of {name}")
        storage = np.dtype("<u2" if dtype == "bfloat16" else dtype).newbyteorder("<")
        if num_bytes != math.prod(shape) * storage.itemsize:
            raise ValueError(
                f"{path}: {name} has {num_bytes} bytes, shape {shape} of {dtype} needs "
                f"{math.prod(shape) * storage.itemsize}"
            )
        value = raw.view(storage).reshape(shape)
        if dtype == "bfloat16":  # bf16 is the top half of a float32
            value = (value.astype(np.uint32) << 16).view(np.float32)
        variables[name] = value

    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(r.unpack("I", "alias count")):
            alias = r.string("alias")
            aliases[alias] = r.string(f"target of alias {alias}")
    if r.pos != len(r.buf):
        raise ValueError(f"{path}: {len(r.buf) - r.pos} unexpected trailing bytes")
    return Ct2Model(version, spec, revision, variables, aliases)


# ---------------------------------------------------------------------------------------
# 2. ct2 variable names -> HF keys
# ---------------------------------------------------------------------------------------

# Placeholders: {i} layer index; {wb} weight|bias; {gb} gamma|beta (ct2's layer-norm names,
# HF's weight|bias). A tuple lists the HF keys of a fused projection's parts, in the order
# ct2 concatenated them along the output rows.
_FFN = {
    "ffn/layer_norm/{gb}": "final_layer_norm.{wb}",
    "ffn/linear_0/{wb}": "fc1.{wb}",
    "ffn/linear_1/{wb}": "fc2.{wb}",
}
_SELF_ATTN = {
    "self_attention/layer_norm/{gb}": "self_attn_layer_norm.{wb}",
    "self_attention/linear_0/{wb}": (
        "self_attn.q_proj.{wb}",
        "self_attn.k_proj.{wb}",
        "self_attn.v_proj.{wb}",
    ),
    "self_attention/linear_1/{wb}": "self_attn.out_proj.{wb}",
}
_CROSS_ATTN = {
    "attention/layer_norm/{gb}": "encoder_attn_layer_norm.{wb}",
    "attention/linear_0/{wb}": "encoder_attn.q_proj.{wb}",
    "attention/linear_1/{wb}": ("encoder_attn.k_proj.{wb}", "encoder_attn.v_proj.{wb}"),
    "attention/linear_2/{wb}": "encoder_attn.out_proj.{wb}",
}


def _prefixed(ct2_prefix: str, hf_prefix: str, block: dict) -> dict:
    return {
        ct2_prefix + k: tuple(hf_prefix + t for t in v) if isinstance(v, tuple) else hf_prefix + v
        for k, v in block.items()
    }


WHISPER_KEY_MAP: dict[str, str | tuple[str, ...]] = {
    "encoder/conv1/{wb}": "model.encoder.conv1.{wb}",
    "encoder/conv2/{wb}": "model.encoder.conv2.{wb}",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    **_prefixed("encoder/layer_{i}/", "model.encoder.layers.{i}.", {**_SELF_ATTN, **_FFN}),
    "encoder/layer_norm/{gb}": "model.encoder.layer_norm.{wb}",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    **_prefixed(
        "decoder/layer_{i}/", "model.decoder.layers.{i}.", {**_SELF_ATTN, **_CROSS_ATTN, **_FFN}
    ),
    "decoder/layer_norm/{gb}": "model.decoder.layer_norm.{wb}",
    # Tied to the embeddings in every released Whisper (ct2 stores it as an alias).
    "decoder/projection/weight": "proj_out.weight",
}
_PLACEHOLDERS = {
    "{i}": r"(?P<i>\d+)",
    "{wb}": r"(?P<wb>weight|bias)",
    "{gb}": r"(?P<gb>gamma|beta)",
}


def _compile_key_map() -> list[tuple[re.Pattern, str | tuple[str, ...]]]:
    compiled = []
    for pattern, target in WHISPER_KEY_MAP.items():
        regex = re.escape(pattern)
        for placeholder, group in _PLACEHOLDERS.items():
            regex = regex.replace(re.escape(placeholder), group)
        compiled.append((re.compile(regex + "$"), target))
    return compiled


_KEY_MAP = _compile_key_map()


def _hf_keys(ct2_name: str) -> tuple[str, ...] | None:
    for regex, target in _KEY_MAP:
        m = regex.match(ct2_name)
        if m is None:
            continue
        fields = m.groupdict()
        if "gb" in fields:
            fields["wb"] = {"gamma": "weight", "beta": "bias"}[fields.pop("gb")]
        targets = (target,) if isinstance(target, str) else target
        return tuple(t.format(**fields) for t in targets)
    return None


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's encoder positions: `[sin(t * f_k) | cos(t * f_k)]`, `f_k` log-spaced in
    `[1, 1 / max_timescale]` over `channels / 2` frequencies. Shape `(length, channels)`."""
    if channels % 2:
        raise ValueError(f"sinusoid channels must be even, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
    scaled_time = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


def ct2_to_hf_state_dict(
    model: Ct2Model, max_source_positions: int = 1500
) -> dict[str, np.ndarray]:
    """HF `WhisperForConditionalGeneration` tensors (float32) from a parsed ct2 Whisper.

    Fused projections are split along their output rows into equal parts. HF's k_proj has
    no bias: ct2 stores zeros there, and a constant key bias would only add the same
    `q . b` to every logit of a query row, which softmax ignores, so it is dropped.
    `proj_out.weight` is left out when it is the embeddings (tied in HF's config).
    """
    if model.spec and model.spec != "WhisperSpec":
        raise ValueError(f"expected a WhisperSpec model.bin, got spec {model.spec!r}")
    if model.scalar("decoder/pre_norm", 1) != 1:
        raise ValueError("Whisper is pre-norm; this model.bin says decoder/pre_norm = 0")
    for scope in ("encoder", "decoder"):
        activation = model.scalar(f"{scope}/activation")
        if activation is not None and activation != _CT2_GELU:
            raise ValueError(f"{scope}/activation is ct2 activation {activation}, not GELU")

    tied = model.resolve("decoder/projection/weight") == model.resolve("decoder/embeddings/weight")
    names = sorted(set(model.variables) | set(model.aliases))
    state: dict[str, np.ndarray] = {}
    unknown = []
    for name in names:
        if name.endswith("_scale") or name not in model:
            continue  # quantization scales are used by float_weight; dangling aliases skipped
        value = model.get(name)
        if value.ndim == 0:
            continue  # flags and counts (num_heads, pre_norm, ...), read where needed
        keys = _hf_keys(name)
        if keys is None:
            unknown.append(name)
            continue
        if keys == ("proj_out.weight",) and tied:
            continue
        weight = model.float_weight(name)
        if weight.shape[0] % len(keys):
            raise ValueError(f"{name} of shape {weight.shape} does not split into {len(keys)}")
        for key, part in zip(keys, np.split(weight, len(keys), axis=0), strict=True):
            if key.endswith("k_proj.bias"):
                continue
            state[key] = np.ascontiguousarray(part)
    if unknown:
        raise ValueError(
            "model.bin has variables this converter does not map (a Whisper variant it does "
            f"not know, e.g. low-rank 'lite' Whisper?): {unknown[:10]}"
        )
    if "model.encoder.embed_positions.weight" not in state:
        d_model = state["model.decoder.embed_tokens.weight"].shape[1]
        state["model.encoder.embed_positions.weight"] = whisper_sinusoids(
            max_source_positions, d_model
        )
    return state


# ---------------------------------------------------------------------------------------
# 3. Configs
# ---------------------------------------------------------------------------------------


def _num_layers(state: dict[str, np.ndarray], stack: str) -> int:
    indices = {
        int(m.group(1)) for k in state if (m := re.match(rf"model\.{stack}\.layers\.(\d+)\.", k))
    }
    if indices != set(range(len(indices))):
        raise ValueError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def whisper_config(
    model: Ct2Model, state: dict[str, np.ndarray], token_ids: dict[str, int]
) -> WhisperConfig:
    """`transformers.WhisperConfig` with every dimension read off the tensors."""
    from transformers import WhisperConfig

    vocab_size, d_model = state["model.decoder.embed_tokens.weight"].shape
    # Every released Whisper has 64-dim heads; older ct2 files do not store num_heads.
    default_heads = d_model // 64
    eot = token_ids["<|endoftext|>"]
    sot = token_ids["<|startoftranscript|>"]
    return WhisperConfig(
        architectures=["WhisperForConditionalGeneration"],
        vocab_size=vocab_size,
        num_mel_bins=state["model.encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(state, "encoder"),
        decoder_layers=_num_layers(state, "decoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads", default_heads),
        decoder_attention_heads=model.scalar("decoder/num_heads", default_heads),
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        activation_function="gelu",
        scale_embedding=bool(model.scalar("decoder/scale_embeddings", 0)),
        tie_word_embeddings="proj_out.weight" not in state,
        pad_token_id=eot,
        bos_token_id=sot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
    )


_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3}|haw|yue)\|>")


def generation_fields(
    vocab_size: int, token_ids: dict[str, int], ct2_config: dict, max_length: int
) -> dict:
    """Whisper generation settings from the vocabulary and ct2's `config.json`.

    Language and task ids are taken from the vocabulary, not from ct2's `lang_ids`, which
    for English-only models points one token past the real ones. As in OpenAI's code, a
    model is multilingual when its vocabulary has >= 51865 entries (English-only: 51864).
    """
    eot = token_ids["<|endoftext|>"]
    sot = token_ids["<|startoftranscript|>"]
    fields = {
        "decoder_start_token_id": sot,
        "bos_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": max_length,
        "begin_suppress_tokens": ct2_config.get(
            "suppress_ids_begin", [token_ids.get("Ġ", 220), eot]
        ),
        "suppress_tokens": ct2_config.get("suppress_ids", []),
        "no_timestamps_token_id": token_ids["<|notimestamps|>"],
        "max_initial_timestamp_index": 50,  # OpenAI's max_initial_timestamp 1.0 s / 0.02 s
        "return_timestamps": False,
        "is_multilingual": vocab_size >= 51865,
    }
    if "<|startofprev|>" in token_ids:
        fields["prev_sot_token_id"] = token_ids["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        fields["alignment_heads"] = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if fields["is_multilingual"]:
        fields["lang_to_id"] = {
            tok: i
            for tok, i in sorted(token_ids.items(), key=lambda kv: kv[1])
            if _LANGUAGE_TOKEN.fullmatch(tok) and sot < i < token_ids["<|translate|>"]
        }
        fields["task_to_id"] = {
            "transcribe": token_ids["<|transcribe|>"],
            "translate": token_ids["<|translate|>"],
        }
    return fields


# ---------------------------------------------------------------------------------------
# 4. Tokenizer, feature extractor, and the whole conversion
# ---------------------------------------------------------------------------------------


def _read_vocabulary(src_dir: str) -> list[str] | None:
    for name in ("vocabulary.txt", "vocabulary.json"):
        path = os.path.join(src_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", newline="") as f:  # no newline translation
            if name.endswith(".json"):
                return json.load(f)
            tokens = f.read().split("\n")  # one token a line
            return tokens[:-1] if tokens and tokens[-1] == "" else tokens
    return None


def _build_tokenizer(tokenizer_json: str, vocabulary: list[str] | None):
    """`WhisperTokenizerFast` from ct2's tokenizer.json, with every token in the model's
    vocabulary: timestamp tokens (`<|0.00|>`...) missing from the json are added, non-special,
    since Whisper's tokenizer tells timestamps apart as the ids after the last special one."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizerFast

    backend = Tokenizer.from_file(tokenizer_json)
    if vocabulary:
        size = backend.get_vocab_size(with_added_tokens=True)
        missing = vocabulary[size:]
        if missing:
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
    return WhisperTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in specials if t != "<|endoftext|>"],
        model_max_length=1024,
    )


def convert_ct2_whisper(src_dir: str, dst_dir: str, dtype: str = "float32") -> None:
    """Write a Hugging Face Whisper folder at `dst_dir` from the ct2 model in `src_dir`.

    Writes `model.safetensors` (`dtype`: "float32" or "float16"), `config.json`,
    `generation_config.json`, `preprocessor_config.json` and the tokenizer files. Without a
    `tokenizer.json` in `src_dir` (token ids then come from `vocabulary.txt`) the tokenizer
    files are skipped with a warning: the model loads, `WhisperProcessor` does not.
    """
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, WhisperFeatureExtractor

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    model = read_ct2_model(os.path.join(src_dir, "model.bin"))
    ct2_config = {}
    if os.path.exists(os.path.join(src_dir, "config.json")):
        with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as f:
            ct2_config = json.load(f)

    state = ct2_to_hf_state_dict(model)
    vocab_size = state["model.decoder.embed_tokens.weight"].shape[0]
    vocabulary = _read_vocabulary(src_dir)
    tokenizer_json = os.path.join(src_dir, "tokenizer.json")
    tokenizer = (
        _build_tokenizer(tokenizer_json, vocabulary) if os.path.exists(tokenizer_json) else None
    )
    if tokenizer is not None:
        token_ids = tokenizer.get_vocab()
    elif vocabulary is not None:
        token_ids = {tok: i for i, tok in enumerate(vocabulary)}
    else:
        raise ValueError(f"{src_dir} has neither tokenizer.json nor vocabulary.txt")
    if len(token_ids) != vocab_size:
        logger.warning("vocabulary has %d tokens, the model %d", len(token_ids), vocab_size)

    config = whisper_config(model, state, token_ids)
    fields = generation_fields(vocab_size, token_ids, ct2_config, config.max_target_positions)
    generation = GenerationConfig(**fields)
    # HF's own Whisper configs repeat the suppress lists in config.json.
    config.suppress_tokens = fields["suppress_tokens"]
    config.begin_suppress_tokens = fields["begin_suppress_tokens"]

    os.makedirs(dst_dir, exist_ok=True)
    tensors = {k: v.astype(dtype) for k, v in state.items()}
    save_file(tensors, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(dst_dir)
    generation.save_pretrained(dst_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(dst_dir)
    if tokenizer is None:
        logger.warning("no tokenizer.json in %s: tokenizer files not written", src_dir)
    else:
        tokenizer.save_pretrained(dst_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxmm.weights.ct2_whisper",
        description="Convert a CTranslate2 (faster-whisper) Whisper model to a HF folder.",
    )
    parser.add_argument("src", help="folder with model.bin, config.json, tokenizer.json")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    convert_ct2_whisper(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
