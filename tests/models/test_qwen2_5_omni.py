"""Qwen2.5-Omni thinker parity with transformers on a tiny random checkpoint (float32).

The checkpoint carries its own `Qwen2_5OmniProcessor` (saved with `save_pretrained`, a
locally trained tokenizer with Omni's special tokens), so the HF side expands the
placeholders with HF's own processor. Text and image prompts must give `generate`'s greedy
tokens and last-token logits within 1e-4; a full `Qwen2_5OmniForConditionalGeneration`
checkpoint (thinker + talker + token2wav) must serve the same tokens through its thinker.
"""

from __future__ import annotations

import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import make_processor, make_tokenizer, qwen2_vl_video_processor
from tests.models.test_vlm_parity import (
    IMAGES,
    VIDEO,
    VIDEO_FPS,
    _chunk_rows,
    _encode_items,
    _image,
    _randomize,
)

NEW_TOKENS = 10
IMG = "<|vision_bos|><|IMAGE|><|vision_eos|>"
NAMES = dict(
    image_token="<|IMAGE|>",
    audio_token="<|AUDIO|>",
    video_token="<|VIDEO|>",
    vision_bos_token="<|vision_bos|>",
    vision_eos_token="<|vision_eos|>",
    audio_bos_token="<|audio_bos|>",
    audio_eos_token="<|audio_eos|>",
)
VID = "<|vision_bos|><|VIDEO|><|vision_eos|>"
# 2 s per temporal patch at 1 fps: TMRoPE time 0 and 50 (25 positions a second)
VIDEO_PROMPTS = [
    {
        "prompt": f"Video: {VID} what happens",
        "multi_modal_data": {"video": (VIDEO, {"fps": VIDEO_FPS})},
    },
    {
        "prompt": f"{IMG} and {VID} then",
        "multi_modal_data": {"image": IMAGES[3], "video": (VIDEO, {"fps": VIDEO_FPS})},
    },
]
SR = 16000
AUD = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def _tone(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * noise).astype(np.float32)


# n_window 20: a 1.9 s clip (190 frames) is 5 chunks of 40 frames, the last one short
AUDIO_PROMPTS = [
    {"prompt": f"{AUD}What is it?", "multi_modal_data": {"audio": (_tone(0.7, 300, 0), SR)}},
    {
        "prompt": f"First {AUD} then {AUD} compare",
        "multi_modal_data": {"audio": [(_tone(1.9, 900, 1), SR), (_tone(1.2, 500, 2), SR)]},
    },
]
# audio beside an image, and beside a video (separate items)
MIXED_PROMPTS = [
    {
        "prompt": f"{IMG} look, {AUD} listen",
        "multi_modal_data": {"image": IMAGES[0], "audio": (_tone(0.7, 300, 0), SR)},
    },
    {
        "prompt": f"{AUD} and {VID} then",
        "multi_modal_data": {
            "audio": (_tone(1.2, 500, 2), SR),
            "video": (VIDEO, {"fps": VIDEO_FPS}),
        },
    },
]
VIDEO8 = np.stack([np.asarray(_image(24, 40, 30 + i)) for i in range(8)])
AV = {"use_audio_in_video": True}
# a video with its audio track (vLLM's form: frames + (samples, rate), use_audio_in_video)
AV_PROMPTS = [
    # 2 s a temporal patch (times 0, 50), 47 audio tokens (25 a chunk): the jump from 0 to
    # 50 cuts twice (a one-token chunk), so video, audio, video, audio, video
    {
        "prompt": f"Video: {VID} what is said",
        "multi_modal_data": {
            "video": (VIDEO, {"fps": VIDEO_FPS}),
            "audio": (_tone(1.9, 900, 1), SR),
        },
        "mm_processor_kwargs": AV,
    },
    # 1 s a temporal patch (times 0, 25): video, audio, video, audio; the end markers
    # follow the audio's last position
    {
        "prompt": f"Video: {VID} what is said",
        "multi_modal_data": {
            "video": (VIDEO, {"fps": 2.0}),
            "audio": (_tone(1.9, 900, 1), SR),
        },
        "mm_processor_kwargs": AV,
    },
    # 1 s a temporal patch (times 0, 25, 50, 75), 10 audio tokens: the video's last three
    # chunks run on alone, the end markers follow the video's; an image before it
    {
        "prompt": f"{IMG} and {VID} then",
        "multi_modal_data": {
            "image": IMAGES[3],
            "video": (VIDEO8, {"fps": 2.0}),
            "audio": (_tone(0.4, 700, 3), SR),
        },
        "mm_processor_kwargs": AV,
    },
]
PROMPTS = [
    {"prompt": "Once upon a time there was"},
    {"prompt": f"{IMG}Describe the image.", "multi_modal_data": {"image": IMAGES[0]}},
    {
        "prompt": f"Hello {IMG} and {IMG} what",
        "multi_modal_data": {"image": [IMAGES[1], IMAGES[2]]},
    },
]


# the thinker's TMRoPE timing, as the processor is handed it (the config's values)
_THINKER_TIMING = dict(position_id_per_seconds=25, seconds_per_chunk=1)


def _thinker_config(tok):
    import transformers

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in NAMES.items()}
    return transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            num_mel_bins=16,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=64,
            n_window=20,
            max_source_positions=100,
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,  # 2x2 merged patches per window
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        # 25 TMRoPE positions a chunk: a 1.9 s clip's 47 tokens make two chunks
        **_THINKER_TIMING,
    )


def _save_processor(path: str):
    """Tokenizer with Omni's named special tokens + `Qwen2_5OmniProcessor`, saved to path."""
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": list(NAMES.values())})
    tok.save_pretrained(path)
    # the processor reads the tokens by name (tok.image_token, ...)
    tok = PreTrainedTokenizerFast.from_pretrained(path, extra_special_tokens=NAMES)
    pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64)
    processor = make_processor(
        transformers.Qwen2_5OmniProcessor,
        image_processor=Qwen2VLImageProcessorPil(**pixels, max_pixels=48 * 48),
        video_processor=qwen2_vl_video_processor(**pixels, max_pixels=48 * 48),
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=2),
        tokenizer=tok,
    )
    processor.save_pretrained(path)
    return tok, processor


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(thinker checkpoint path, root of the others, HF thinker, HF processor); the
    processor is the one saved (loading it back needs torchvision for its video part)."""
    import transformers

    root = tmp_path_factory.mktemp("omni")
    path = str(root / "thinker")
    tok, processor = _save_processor(path)
    cfg = _thinker_config(tok)
    cfg.architectures = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    _randomize(model, 2)  # a seed whose greedy text varies
    model.save_pretrained(path)
    return path, str(root), model, processor


def _hf_inputs(processor, prompt: dict) -> dict:
    data = prompt.get("multi_modal_data") or {}
    images, audio = data.get("image"), data.get("audio")
    if images is not None and not isinstance(images, list):
        images = [images]
    if audio is not None:
        audio = [a for a, _ in (audio if isinstance(audio, list) else [audio])]
    return dict(processor(text=prompt["prompt"], images=images, audio=audio, return_tensors="pt"))


def _hf_video_inputs(processor, prompt: dict) -> dict:
    """HF inputs for a prompt with a video, the video's patches and placeholder built here
    as `Qwen2_5OmniProcessor` does (its video processor needs torchvision): each frame
    through the image processor, one of its two temporal copies kept, frames paired. An
    audio item goes through the processor's feature extractor; under use_audio_in_video it
    is the video's track, and the video's placeholder is the processor's own
    (`replace_video_with_audio_token`)."""
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (
        _get_feat_extract_output_lengths,
    )

    data = prompt["multi_modal_data"]
    in_video = bool((prompt.get("mm_processor_kwargs") or {}).get("use_audio_in_video"))
    frames, meta = data["video"]
    ip = processor.image_processor
    per_frame = ip(images=list(frames), return_tensors="np")
    _, gh, gw = per_frame["image_grid_thw"][0]
    px = per_frame["pixel_values"].reshape(len(frames), gh * gw, 3, 2, 4, 4)[:, :, :, 0]
    t = len(frames) // 2
    px = px.reshape(t, 2, gh * gw, 3, 4, 4).transpose(0, 2, 3, 1, 4, 5).reshape(t * gh * gw, -1)
    tok = processor.tokenizer
    text = prompt["prompt"]
    inputs = dict(
        pixel_values_videos=torch.tensor(px),
        video_grid_thw=torch.tensor([[t, gh, gw]]),
        video_second_per_grid=torch.tensor([2 / meta["fps"]]),
    )
    video_text = tok.video_token * (t * gh * gw // 4)
    if "audio" in data:
        feats = processor.feature_extractor(
            [data["audio"][0]],
            sampling_rate=SR,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="np",
        )
        n_audio = int(_get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))[0])
        inputs.update(
            input_features=torch.tensor(feats["input_features"]),
            feature_attention_mask=torch.tensor(feats["attention_mask"]),
        )
        if in_video:
            cfg = _THINKER_TIMING
            video_text = processor.replace_video_with_audio_token(
                {
                    "video_grid_thw": np.array([[t, gh, gw]]),
                    "video_second_per_grid": [2 / meta["fps"]],
                },
                0,
                {"num_audio_tokens": [n_audio]},
                0,
                **cfg,
            )
            inputs["use_audio_in_video"] = True
        else:
            text = text.replace(tok.audio_token, tok.audio_token * n_audio)
    text = text.replace(tok.video_token, video_text)
    if "image" in data:  # the processor refuses video tokens without videos: expanded here
        out = ip(images=[data["image"]], return_tensors="np")
        inputs.update(
            pixel_values=torch.tensor(out["pixel_values"]),
            image_grid_thw=torch.tensor(out["image_grid_thw"]),
        )
        n = int(np.prod(out["image_grid_thw"][0])) // 4
        text = text.replace(tok.image_token, tok.image_token * n)
    ids = torch.tensor([tok(text).input_ids])
    return dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))


def _hf_generate(model, inputs: dict) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _params():
    from jaxmm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _llm(path: str):
    from jaxmm import LLM

    return LLM(
        path, dtype="float32", max_model_len=256, max_num_batched_tokens=64, enable_mm_embeds=True
    )


def _last_logits(llm, prompt: dict) -> np.ndarray:
    """Last-token logits of one prompt, prefilled in chunks of 24 tokens so image spans
    straddle steps (scratch pages at the top of the pool; the engine is idle)."""
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from jaxmm.runner.model_runner import SeqStep

    engine = llm.llm_engine
    runner = engine.runner
    if "multi_modal_data" in prompt:
        _, ids, mm = prepare_multimodal_prompt(engine, prompt)
    else:
        ids, mm = llm.get_tokenizer()(prompt["prompt"]).input_ids, None
    n = math.ceil(len(ids) / runner.block_size)
    pages = list(range(runner.num_pages - n, runner.num_pages))
    rows_of = _encode_items(engine, mm)
    for start in range(0, len(ids), 24):
        chunk = ids[start : start + 24]
        step = SeqStep(chunk, start, pages, sample=start + len(chunk) == len(ids))
        if mm is not None:
            mm.fill_step(step, None, start, len(chunk))
            step.mm_rows = _chunk_rows(mm, rows_of, start, len(chunk))
        last = runner.logits([step])[0]
    return np.asarray(last)


def test_thinker_text_and_images_match_transformers(omni):
    path, _, hf, processor = omni
    llm = _llm(path)
    outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    image_token = hf.config.image_token_id
    for prompt, out in zip(PROMPTS, outs):
        inputs = _hf_inputs(processor, prompt)
        ids = inputs["input_ids"][0]
        if "multi_modal_data" in prompt:
            assert int((ids == image_token).sum()) > 3  # HF's processor expanded the images
        assert out.prompt_token_ids == ids.tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
        with torch.no_grad():
            ref = hf(**inputs).logits[0, -1].numpy()
        np.testing.assert_allclose(_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model


def test_thinker_audio_matches_transformers(omni):
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    path, _, hf, processor = omni
    llm = _llm(path)
    engine = llm.llm_engine
    outs = llm.generate(AUDIO_PROMPTS, _params(), use_tqdm=False)
    audio_token = hf.config.audio_token_id
    feats0 = None
    for prompt, out in zip(AUDIO_PROMPTS, outs):
        inputs = _hf_inputs(processor, prompt)
        ids = inputs["input_ids"][0]
        assert int((ids == audio_token).sum()) > 3  # HF's processor expanded the audio
        assert out.prompt_token_ids == ids.tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
        with torch.no_grad():
            ref = hf(**inputs).logits[0, -1].numpy()
            feats = hf.get_audio_features(
                inputs["input_features"], inputs["feature_attention_mask"]
            ).pooler_output.numpy()
        np.testing.assert_allclose(_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)
        feats0 = feats if prompt is AUDIO_PROMPTS[0] else feats0
        # the spliced rows are HF's audio features, items back to back
        _, _, mm = prepare_multimodal_prompt(engine, prompt)
        rows = _encode_items(engine, mm)
        ours = np.concatenate(
            [np.asarray(engine.runner.encoder_cache)[rows[it.cache_key]] for it in mm.items]
        )
        np.testing.assert_allclose(ours, feats, atol=1e-4, rtol=0)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)
    # HF's audio features as precomputed embeddings: the audio's tokens
    embeds = {
        "prompt": AUDIO_PROMPTS[0]["prompt"],
        "multi_modal_data": {"audio": {"audio_embeds": feats0}},
    }
    assert llm.generate([embeds], _params(), use_tqdm=False)[0].outputs[0].token_ids == (
        outs[0].outputs[0].token_ids
    )
    with pytest.raises(ValueError, match="audio embeddings must have shape"):
        bad = {"audio_embeds": feats0[:, :-1]}
        llm.generate([{**embeds, "multi_modal_data": {"audio": bad}}], _params(), use_tqdm=False)


def test_thinker_video_matches_transformers(omni):
    path, _, hf, processor = omni
    llm = _llm(path)
    outs = llm.generate(VIDEO_PROMPTS, _params(), use_tqdm=False)
    for prompt, out in zip(VIDEO_PROMPTS, outs):
        inputs = _hf_video_inputs(processor, prompt)
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
        with torch.no_grad():
            ref = hf(**inputs).logits[0, -1].numpy()
        np.testing.assert_allclose(_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)


def _check_against_transformers(llm, hf, processor, prompts: list) -> list:
    """jaxmm's prompt ids, greedy tokens and last-token logits against transformers'."""
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        data = prompt["multi_modal_data"]
        make = _hf_video_inputs if "video" in data else _hf_inputs
        inputs = make(processor, prompt)
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
        with torch.no_grad():
            ref = hf(**inputs).logits[0, -1].numpy()
        np.testing.assert_allclose(_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)
    return outs


def _runs_of(ids: list[int], token: int) -> int:
    """How many separate runs of `token` the ids hold."""
    return sum(1 for i, t in enumerate(ids) if t == token and (i == 0 or ids[i - 1] != token))


def test_thinker_audio_beside_images_and_video_matches_transformers(omni):
    path, _, hf, processor = omni
    outs = _check_against_transformers(_llm(path), hf, processor, MIXED_PROMPTS)
    c = hf.config
    for out, vision in zip(outs, (c.image_token_id, c.video_token_id), strict=True):
        ids = out.prompt_token_ids
        assert ids.count(c.audio_token_id) > 3 and ids.count(vision) > 3


def test_thinker_video_with_its_audio_track_matches_transformers(omni):
    """use_audio_in_video: the video's and the audio's tokens interleave by TMRoPE time
    (the processor's layout), positions as the thinker's get_rope_index."""
    path, _, hf, processor = omni
    llm = _llm(path)
    outs = _check_against_transformers(llm, hf, processor, AV_PROMPTS)
    c = hf.config
    runs = [
        (
            _runs_of(o.prompt_token_ids, c.video_token_id),
            _runs_of(o.prompt_token_ids, c.audio_token_id),
        )
        for o in outs
    ]
    assert runs == [(3, 2), (2, 2), (2, 1)]
    # frames without a rate: 2 fps, as the Omni processor takes them (at 24 fps every
    # video token would fall in the first chunk)
    bare = dict(
        AV_PROMPTS[1], multi_modal_data={**AV_PROMPTS[1]["multi_modal_data"], "video": VIDEO}
    )
    same = llm.generate([bare], _params(), use_tqdm=False)[0]
    assert same.prompt_token_ids == outs[1].prompt_token_ids
    assert same.outputs[0].token_ids == outs[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="one audio per video"):
        two = dict(AV_PROMPTS[0]["multi_modal_data"])
        two["audio"] = [two["audio"], two["audio"]]
        llm.generate([{**AV_PROMPTS[0], "multi_modal_data": two}], _params(), use_tqdm=False)


def test_chat_parts_render_omni_placeholders(omni):
    """`input_audio` and image chat parts become Omni's placeholders, expanded as in a
    prompt (the chat path adds no BOS: the template's text is tokenized as it is)."""
    from tests.helpers import assert_audio_and_image_chat_parts

    path = omni[0]
    llm = _llm(path)
    audio = AUDIO_PROMPTS[0]["multi_modal_data"]["audio"][0]
    assert_audio_and_image_chat_parts(llm, audio, SR, IMAGES[0], (AUD, IMG), _params())


def _save_full_checkpoint(path: str, thinker_path: str, thinker) -> None:
    """A full `Qwen2_5OmniForConditionalGeneration` (tiny talker and token2wav) holding
    `thinker`'s weights, with the thinker checkpoint's tokenizer and processor files."""
    import transformers

    tc = thinker.config
    ids = {k: getattr(tc, k) for k in ("vision_start_token_id", "vision_end_token_id")}
    ids.update(
        audio_start_token_id=tc.audio_start_token_id, audio_end_token_id=tc.audio_end_token_id
    )
    talker = dict(
        ids,
        vocab_size=64,
        embedding_size=64,  # the thinker's hidden size
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
        audio_token_index=tc.audio_token_id,
        image_token_index=tc.image_token_id,
        video_token_index=tc.video_token_id,
        tts_text_start_token_id=1,
        tts_text_end_token_id=2,
        tts_text_pad_token_id=3,
    )
    dit = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        emb_dim=16,
        num_embeds=64,
        mel_dim=8,
        enc_emb_dim=8,
        enc_dim=8,
        enc_channels=[16, 16, 16, 16, 48],
        enc_attention_channels=8,
        enc_se_channels=8,
        look_ahead_layers=[1],
        look_backward_layers=[0],
    )
    bigvgan = dict(
        mel_dim=8,
        upsample_initial_channel=16,
        upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3, 5]],
    )
    cfg = transformers.Qwen2_5OmniConfig(
        thinker_config=tc.to_dict(),
        talker_config=talker,
        token2wav_config=dict(dit_config=dit, bigvgan_config=bigvgan),
    )
    cfg.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    full = transformers.Qwen2_5OmniForConditionalGeneration(cfg).eval()
    full.thinker.load_state_dict(thinker.state_dict())
    full.save_pretrained(path)
    for name in os.listdir(thinker_path):
        if name.startswith(("tokenizer", "processor", "chat_template")):
            shutil.copy(os.path.join(thinker_path, name), path)


def test_full_omni_checkpoint_serves_its_thinker(omni, caplog):
    path, root, hf, processor = omni
    full = os.path.join(root, "full")
    _save_full_checkpoint(full, path, hf)
    with caplog.at_level(logging.INFO, logger="jaxmm.models.qwen2_5_omni"):
        llm = _llm(full)
    skipped = [r for r in caplog.records if "talker and token2wav" in r.getMessage()]
    assert len(skipped) == 1
    prompts = PROMPTS[:2]
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_generate(hf, _hf_inputs(processor, prompt))


def _avi(frames: np.ndarray, fps: float) -> bytes:
    """An MJPG AVI of RGB frames (OpenCV), as a client would upload a video file."""
    import tempfile

    import cv2

    h, w = frames.shape[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.avi")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
        assert writer.isOpened()
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # BGR
        writer.release()
        with open(path, "rb") as f:
            return f.read()


def test_server_chat_takes_a_video_with_its_audio_track(omni):
    """/v1/chat/completions with the openai client: a video_url part, an input_audio part
    and mm_processor_kwargs use_audio_in_video give one interleaved span (the audio part
    adds no placeholder of its own) and the offline engine's tokens for the same media."""
    import base64

    import openai

    from jaxmm.engine.async_engine import AsyncEngine
    from jaxmm.server.app import build_app
    from tests.helpers import wav_base64
    from tests.server.util import running_server

    path = omni[0]
    llm = _llm(path)
    tok = llm.get_tokenizer()
    video = _avi(VIDEO, fps=1.0)
    audio = _tone(1.9, 900, 1)
    wav = wav_base64(audio, SR)
    text = f"<|user|>{VID}\nWhat?<|end|><|assistant|>"
    offline = llm.generate(
        [
            {
                "prompt_token_ids": tok(text, add_special_tokens=False).input_ids,
                "multi_modal_data": {"video": video, "audio": (audio, SR)},
                "mm_processor_kwargs": AV,
            }
        ],
        _params(),
        use_tqdm=False,
    )[0]
    c = llm.llm_engine.hf_config
    assert _runs_of(offline.prompt_token_ids, c.audio_token_id) == 2  # interleaved
    client = AsyncEngine(llm.llm_engine)
    app = build_app(client, served_model_names=["omni"], model_path=path, api_keys="sk-test")
    content = [
        {
            "type": "video_url",
            "video_url": {"url": "data:video/x-msvideo;base64," + base64.b64encode(video).decode()},
        },
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
        {"type": "text", "text": "What?"},
    ]
    try:
        with running_server(app) as url:
            oai = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)
            r = oai.chat.completions.create(
                model="omni",
                messages=[{"role": "user", "content": content}],
                max_tokens=NEW_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True, "mm_processor_kwargs": AV},
            )
            assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
            assert r.choices[0].message.content == offline.outputs[0].text
            # without the option the audio is an item of its own, with its own placeholder
            r = oai.chat.completions.create(
                model="omni",
                messages=[{"role": "user", "content": content}],
                max_tokens=1,
                extra_body={"ignore_eos": True},
            )
            # the same tokens, markers outside the video's span, and one more "\n" part break
            assert r.usage.prompt_tokens == len(offline.prompt_token_ids) + 1
    finally:
        client.shutdown()
