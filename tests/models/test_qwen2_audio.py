"""Qwen2-Audio parity with transformers on a tiny random checkpoint (float32).

The checkpoint carries its own processor (a 2 s WhisperFeatureExtractor and a locally
trained tokenizer with the audio tokens), so placeholder expansion is HF's. Prompts with
one and two audio items of different lengths must give HF `generate`'s greedy tokens, and
the spliced audio rows must equal HF's projected audio features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.multimodal.audio_inputs import audio_frontend, prepare_audio_prompt
from tests.helpers import make_tokenizer

SR = 16000
NEW_TOKENS = 12
AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def _tone(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory):
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    path = str(tmp_path_factory.mktemp("qwen2_audio"))
    tok = make_tokenizer(path)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]}
    )
    fe = WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(path)
    config = Qwen2AudioConfig(
        audio_config=dict(
            num_mel_bins=16,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            d_model=32,
            max_source_positions=100,  # 200 mel frames: the 2 s window
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config)
    with torch.no_grad():  # larger-than-default init so greedy paths are not ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.eval().save_pretrained(path)
    return path, model


def test_qwen2_audio_matches_transformers(qwen2_audio):
    from transformers import AutoProcessor

    path, model = qwen2_audio
    prompts = [
        (f"{AUDIO}What is it?", [_tone(0.7, 300, 0)]),
        (f"First {AUDIO} then {AUDIO} compare", [_tone(1.9, 900, 1), _tone(1.2, 500, 2)]),
    ]
    processor = AutoProcessor.from_pretrained(path)
    ref, ref_feats = [], []
    for text, audios in prompts:
        x = processor(text=text, audio=audios, sampling_rate=SR, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **x, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
            )
            audio = model.model.audio_tower(
                x["input_features"],
                attention_mask=_hf_audio_mask(x["feature_attention_mask"]),
            ).last_hidden_state
            ref_feats.append(model.model.multi_modal_projector(audio).numpy())
        ref.append(out[0, x["input_ids"].shape[1] :].tolist())
        n_tokens = int((x["input_ids"] == model.config.audio_token_index).sum())
        assert n_tokens > len(audios)  # the processor expanded the placeholders

    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=256)
    engine = llm.llm_engine
    outs = []
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, (text, audios) in enumerate(prompts):
        prompt = {"prompt": text, "multi_modal_data": {"audio": [(a, SR) for a in audios]}}
        _, ids, mm = prepare_audio_prompt(engine, prompt)
        # the spliced rows are HF's projected audio features (first n rows of each item)
        for item, feats in zip(mm.items, ref_feats[i]):
            rows = np.arange(item.end - item.start, dtype=np.int32)  # scratch rows
            engine.runner.encode([("audio", item.data, rows)])
            ours = np.asarray(engine.runner.encoder_cache)[rows]
            np.testing.assert_allclose(ours, feats[: item.end - item.start], atol=1e-4, rtol=0)
        engine.add_request(f"q{i}", text, params, prompt_ids=ids, mm=mm)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    outs = [done[f"q{i}"] for i in range(len(prompts))]
    assert outs == ref
    assert audio_frontend(engine).mono


def _hf_audio_mask(feature_attention_mask):
    """The 4-D key mask HF's Qwen2AudioModel builds for its audio tower."""
    lengths = (feature_attention_mask.sum(-1) - 1) // 2 + 1
    C = (feature_attention_mask.shape[-1] - 2) // 2 + 1
    keep = torch.arange(C)[None, :] < lengths[:, None]
    mask = torch.zeros(keep.shape, dtype=torch.float32)
    mask[~keep] = torch.finfo(torch.float32).min
    return mask[:, None, None, :].expand(-1, 1, C, C)
