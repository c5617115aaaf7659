"""Voxtral parity with transformers on a tiny random checkpoint (float32).

The checkpoint: a 2 s encoder window (100 positions, 200 mel frames), 4 frames stacked per
audio token (25 tokens per window), a Llama decoder, a locally trained tokenizer with
Voxtral's [INST] / [BEGIN_AUDIO] / [AUDIO] tokens. The HF side gets its features as
VoxtralProcessor computes them (the clip padded to whole windows, log-mel over all of it,
cut into windows) and its placeholders expanded here (the processor itself needs
mistral_common). Clips of one and of two windows, two clips in one prompt: HF `generate`'s
greedy tokens; the spliced rows equal HF's `get_audio_features`; precomputed rows give the
same tokens. Chat renders with the kept Voxtral template (the checkpoint has none), and
/v1/audio/transcriptions sends mistral_common's transcription request through a real
server: the openai client's text is the offline greedy transcription of the same prompt.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.multimodal.audio_inputs import prepare_audio_prompt
from tests.helpers import make_tokenizer, wav_bytes
from tests.models.test_qwen2_audio import _tone

SR = 16000
NEW_TOKENS = 12
WINDOW = 2 * SR
PER_WINDOW = 25
AUDIO = "[BEGIN_AUDIO][AUDIO]"


@pytest.fixture(scope="module")
def voxtral(tmp_path_factory):
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    path = str(tmp_path_factory.mktemp("voxtral"))
    tok = make_tokenizer(path)
    specials = ["[INST]", "[/INST]", "[BEGIN_AUDIO]", "[AUDIO]", "[TRANSCRIBE]"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = None  # as Voxtral's checkpoints: the template is mistral_common's
    os.remove(os.path.join(path, "chat_template.jinja"))  # make_tokenizer's
    tok.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=16, chunk_length=2).save_pretrained(path)
    config = VoxtralConfig(
        audio_config=dict(
            num_mel_bins=16,
            hidden_size=32,
            intermediate_size=128,  # 4 frames per token
            num_hidden_layers=2,
            num_attention_heads=4,
            max_source_positions=100,
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            rope_theta=10000.0,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        audio_token_id=tok.convert_tokens_to_ids("[AUDIO]"),
    )
    config.architectures = ["VoxtralForConditionalGeneration"]
    torch.manual_seed(0)
    model = VoxtralForConditionalGeneration(config)
    with torch.no_grad():  # larger-than-default init so greedy paths are not ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.eval().save_pretrained(path)
    return path, model, tok


def _hf_features(path: str, clips: list[np.ndarray]) -> torch.Tensor:
    """VoxtralProcessor's features: each clip padded to whole windows, log-mel over all of
    it, cut into windows stacked along the batch -> (total windows, mel, frames)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(path)
    out = []
    for clip in clips:
        feats = fe(
            clip,
            sampling_rate=SR,
            padding=True,
            truncation=False,
            pad_to_multiple_of=WINDOW,
            return_tensors="pt",
        )["input_features"]
        out.append(feats.reshape(fe.feature_size, -1, 200).transpose(0, 1))
    return torch.cat(out)


def _expand(text: str, clips: list[np.ndarray]) -> str:
    pieces = text.split("[AUDIO]")
    windows = [-(-len(c) // WINDOW) for c in clips]
    return pieces[0] + "".join(
        "[AUDIO]" * (w * PER_WINDOW) + r for w, r in zip(windows, pieces[1:])
    )


PROMPTS = [
    (f"[INST]{AUDIO}What is it?[/INST]", [_tone(0.7, 300, 0)]),
    (f"[INST]First {AUDIO} then {AUDIO} compare[/INST]", [_tone(3.1, 900, 1), _tone(1.2, 500, 2)]),
]


def test_voxtral_matches_transformers(voxtral):
    path, model, tok = voxtral
    ref, ref_rows = [], []
    for text, clips in PROMPTS:
        ids = torch.tensor([tok(_expand(text, clips)).input_ids])
        feats = _hf_features(path, clips)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                input_features=feats,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
            ref_rows.append(model.get_audio_features(feats).pooler_output.numpy())
        ref.append(out[0, ids.shape[1] :].tolist())

    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=256)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for (text, clips), rows in zip(PROMPTS, ref_rows):
        prompt = {"prompt": text, "multi_modal_data": {"audio": [(c, SR) for c in clips]}}
        _, ids, mm = prepare_audio_prompt(engine, prompt)
        assert ids == tok(_expand(text, clips)).input_ids
        ours = []
        for item in mm.items:
            scratch = np.arange(item.end - item.start, dtype=np.int32)
            engine.runner.encode([("audio", item.data, scratch)])
            ours.append(np.asarray(engine.runner.encoder_cache)[scratch])
        np.testing.assert_allclose(np.concatenate(ours), rows, atol=1e-4, rtol=0)
    outs = llm.generate(
        [{"prompt": t, "multi_modal_data": {"audio": [(c, SR) for c in cs]}} for t, cs in PROMPTS],
        params,
        use_tqdm=False,
    )
    assert [list(o.outputs[0].token_ids) for o in outs] == ref
    assert outs[1].prompt_token_ids.count(model.config.audio_token_id) == 3 * PER_WINDOW


def test_voxtral_audio_embeds(voxtral):
    path, model, _ = voxtral
    text, clips = PROMPTS[1]
    feats = _hf_features(path, clips)
    with torch.no_grad():
        rows = model.get_audio_features(feats).pooler_output.numpy()
    llm = LLM(path, dtype="float32", max_model_len=256, enable_mm_embeds=True)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    audio = {"audio": [(c, SR) for c in clips]}
    embeds = {"audio": [{"audio_embeds": rows[: 2 * PER_WINDOW]}, {"audio_embeds": rows[50:]}]}
    want, got = llm.generate(
        [{"prompt": text, "multi_modal_data": d} for d in (audio, embeds)], params, use_tqdm=False
    )
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.prompt_token_ids == want.prompt_token_ids
    with pytest.raises(ValueError, match=f"multiple of {PER_WINDOW}"):
        llm.generate(
            {"prompt": text, "multi_modal_data": {"audio_embeds": [rows[:30], rows[:25]]}},
            params,
            use_tqdm=False,
        )


def test_voxtral_chat_and_transcriptions(voxtral):
    from openai import OpenAI

    from tests.server.live_util import KEY, NAME, live_server

    path, _, tok = voxtral
    clip = _tone(2.6, 400, 3)
    kw = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=256)
    llm = LLM(path, **kw)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    parts = [{"type": "audio", "audio": (clip, SR)}, {"type": "text", "text": "What is it?"}]
    [chat] = llm.chat([{"role": "user", "content": parts}], params, use_tqdm=False)
    text = f"[INST]{AUDIO}What is it?[/INST]"
    [ref] = llm.generate(
        {"prompt": text, "multi_modal_data": {"audio": (clip, SR)}}, params, use_tqdm=False
    )
    assert chat.prompt_token_ids == ref.prompt_token_ids == tok(_expand(text, [clip])).input_ids
    assert chat.outputs[0].token_ids == ref.outputs[0].token_ids

    # mistral_common's transcription request; the server takes the whole answer (no
    # max_tokens): a random model runs to max_model_len, the same offline
    request = "[INST][BEGIN_AUDIO][AUDIO][/INST]lang:en[TRANSCRIBE]"
    [want] = llm.generate(
        {"prompt": request, "multi_modal_data": {"audio": (clip, SR)}},
        SamplingParams(temperature=0, max_tokens=None),
        use_tqdm=False,
    )
    assert want.outputs[0].text.strip()
    with live_server(path, **kw) as (_, url):
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
        got = client.audio.transcriptions.create(
            model=NAME, file=("a.wav", wav_bytes(clip, SR), "audio/wav"), language="en"
        )
    assert got.text == want.outputs[0].text.strip()
