"""Qwen3-Omni-MoE thinker parity with transformers on a tiny random checkpoint (float32).

The checkpoint carries its own `Qwen3OmniMoeProcessor` (saved with `save_pretrained`, a
locally trained tokenizer with the released checkpoint's special tokens), so the HF side
expands the placeholders with HF's own processor (videos by hand: `_hf_video_inputs`, as
its video processor needs torchvision). Text, image, audio and video prompts must give
`generate`'s greedy tokens and last-token logits within 1e-4 (prefilled in chunks, so items
straddle steps). The tiny model has DeepStack after decoder layers 0 and 1, a dense layer
between MoE ones, un-normalised top-k routing, and an audio tower whose attention windows
hold two chunks (n_window_infer 200), so a 2.3 s clip is windows of 26 + 4 rows.
A full `Qwen3OmniMoeForConditionalGeneration` checkpoint (thinker + talker + code2wav)
must serve the same tokens through its thinker.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import make_processor, make_tokenizer, qwen2_vl_video_processor
from tests.models.test_qwen2_5_omni import (
    SR,
    _hf_generate,
    _hf_video_inputs,
    _last_logits,
    _params,
    _tone,
)
from tests.models.test_vlm_parity import IMAGES, VIDEO, VIDEO_FPS, _encode_items, _randomize

NAMES = dict(
    image_token="<|image_pad|>",
    audio_token="<|audio_pad|>",
    video_token="<|video_pad|>",
    vision_bos_token="<|vision_start|>",
    vision_eos_token="<|vision_end|>",
    audio_bos_token="<|audio_start|>",
    audio_eos_token="<|audio_end|>",
)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
AUD = "<|audio_start|><|audio_pad|><|audio_end|>"
PROMPTS = [
    {"prompt": "Once upon a time there was"},
    {"prompt": f"{IMG}Describe the image.", "multi_modal_data": {"image": IMAGES[0]}},
    {
        "prompt": f"Hello {IMG} and {IMG} what",
        "multi_modal_data": {"image": [IMAGES[2], IMAGES[3]]},
    },
]
# 0.7 s: one chunk of 70 frames; 2.3 s: chunks of 100, 100 and 30 frames (rows 13 + 13 + 4,
# windows of 26). Two clips in one prompt have one length: HF's processor pads a prompt's
# clips to the longest, which changes a shorter clip's last frames (jaxmm takes each alone).
AUDIO_PROMPTS = [
    {"prompt": f"{AUD}What is it?", "multi_modal_data": {"audio": (_tone(0.7, 300, 0), SR)}},
    {"prompt": f"Hear {AUD} now", "multi_modal_data": {"audio": (_tone(2.3, 700, 3), SR)}},
    {
        "prompt": f"First {AUD} then {AUD} compare",
        "multi_modal_data": {"audio": [(_tone(1.2, 900, 1), SR), (_tone(1.2, 500, 2), SR)]},
    },
]


def _thinker_config(tok):
    import transformers

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in NAMES.items()}
    return transformers.Qwen3OmniMoeThinkerConfig(
        audio_config=dict(
            num_mel_bins=16,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=64,
            n_window=50,  # HF's token count assumes 13 rows per full chunk: 100 frames
            n_window_infer=200,
            downsample_hidden_size=8,
            max_source_positions=100,
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 2],
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "interleaved": True,
            },
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        audio_token_id=ids["audio_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        position_id_per_seconds=13,
    )


def _save_processor(path: str):
    """Tokenizer with the Omni special tokens + `Qwen3OmniMoeProcessor`, saved to path."""
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
        transformers.Qwen3OmniMoeProcessor,
        image_processor=Qwen2VLImageProcessorPil(**pixels, max_pixels=48 * 48),
        video_processor=qwen2_vl_video_processor(**pixels, max_pixels=48 * 48),
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=16),
        tokenizer=tok,
    )
    processor.save_pretrained(path)
    return tok, processor


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(thinker checkpoint path, HF thinker, HF processor, jaxmm LLM)."""
    import transformers

    from jaxmm import LLM

    path = str(tmp_path_factory.mktemp("omni3") / "thinker")
    tok, processor = _save_processor(path)
    cfg = _thinker_config(tok)
    cfg.architectures = ["Qwen3OmniMoeThinkerForConditionalGeneration"]
    model = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    _randomize(model, 2)
    model.save_pretrained(path)
    llm = LLM(
        path, dtype="float32", max_model_len=256, max_num_batched_tokens=64, enable_mm_embeds=True
    )
    return path, model, processor, llm


def _hf_inputs(processor, prompt: dict) -> dict:
    data = prompt.get("multi_modal_data") or {}
    images, audio = data.get("image"), data.get("audio")
    if images is not None and not isinstance(images, list):
        images = [images]
    if audio is not None:
        audio = [a for a, _ in (audio if isinstance(audio, list) else [audio])]
    return dict(processor(text=prompt["prompt"], images=images, audio=audio, return_tensors="pt"))


def _check(llm, hf, processor, prompts, token_id: int) -> list:
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        inputs = _hf_inputs(processor, prompt)
        ids = inputs["input_ids"][0]
        if "multi_modal_data" in prompt:
            assert int((ids == token_id).sum()) > 3  # HF's processor expanded the items
        assert out.prompt_token_ids == ids.tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
        with torch.no_grad():
            ref = hf(**inputs).logits[0, -1].numpy()
        np.testing.assert_allclose(_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model
    return outs


def test_thinker_text_and_images_match_transformers(omni):
    _, hf, processor, llm = omni
    _check(llm, hf, processor, PROMPTS, hf.config.image_token_id)


def test_thinker_audio_matches_transformers(omni):
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    _, hf, processor, llm = omni
    engine = llm.llm_engine
    outs = _check(llm, hf, processor, AUDIO_PROMPTS, hf.config.audio_token_id)
    D = hf.config.text_config.hidden_size
    feats1 = None
    for prompt in AUDIO_PROMPTS:
        inputs = _hf_inputs(processor, prompt)
        with torch.no_grad():
            feats = hf.get_audio_features(
                inputs["input_features"], inputs["feature_attention_mask"]
            ).last_hidden_state.numpy()
        # the spliced rows are HF's audio features, items back to back (DeepStack columns 0)
        _, _, mm = prepare_multimodal_prompt(engine, prompt)
        rows = _encode_items(engine, mm)
        cache = np.asarray(engine.runner.encoder_cache)
        ours = np.concatenate([cache[rows[it.cache_key]] for it in mm.items])
        np.testing.assert_allclose(ours[:, :D], feats, atol=1e-4, rtol=0)
        assert not ours[:, D:].any()
        if prompt is AUDIO_PROMPTS[1]:
            feats1 = feats
    assert outs[1].outputs[0].token_ids != outs[0].outputs[0].token_ids
    # HF's audio features as precomputed embeddings: the audio's tokens
    embeds = {"prompt": AUDIO_PROMPTS[1]["prompt"], "multi_modal_data": {"audio": {}}}
    embeds["multi_modal_data"]["audio"]["audio_embeds"] = feats1
    got = llm.generate([embeds], _params(), use_tqdm=False)[0].outputs[0].token_ids
    assert got == outs[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="audio embeddings must have shape"):
        bad = {"audio_embeds": feats1[:, :-1]}
        llm.generate([{**embeds, "multi_modal_data": {"audio": bad}}], _params(), use_tqdm=False)


def test_thinker_video_matches_transformers(omni):
    """Videos are plain `<|video_pad|>` runs; 2 s per temporal patch at 1 fps puts their
    TMRoPE times at 0 and 26 (13 positions a second)."""
    _, hf, processor, llm = omni
    vid = "<|vision_start|><|video_pad|><|vision_end|>"
    video = (VIDEO, {"fps": VIDEO_FPS})
    prompts = [
        {"prompt": f"Video: {vid} what happens", "multi_modal_data": {"video": video}},
        {
            "prompt": f"{IMG} and {vid} then",
            "multi_modal_data": {"image": IMAGES[3], "video": video},
        },
    ]
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        inputs = _hf_video_inputs(processor, prompt)
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
        with torch.no_grad():
            ref = hf(**inputs).logits[0, -1].numpy()
        np.testing.assert_allclose(_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)


def _save_full_checkpoint(path: str, thinker_path: str, thinker) -> None:
    """A full `Qwen3OmniMoeForConditionalGeneration` (tiny talker and code2wav) holding
    `thinker`'s weights, with the thinker checkpoint's tokenizer and processor files."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=16)
    talker = dict(
        text_config=dict(
            small,
            vocab_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            rope_parameters=dict(rope, interleaved=True),
        ),
        code_predictor_config=dict(
            small, vocab_size=64, num_attention_heads=2, num_key_value_heads=1, num_code_groups=2
        ),
        num_code_groups=2,
        thinker_hidden_size=thinker.config.text_config.hidden_size,
        accept_hidden_layer=1,
        spatial_merge_size=2,  # read by the talker's __init__, absent from its config class
    )
    code2wav = dict(
        codebook_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        num_quantizers=2,
        upsample_rates=(2, 2),
        upsampling_ratios=(2,),
        decoder_dim=16,
        sliding_window=8,
    )
    cfg = transformers.Qwen3OmniMoeConfig(
        thinker_config=thinker.config.to_dict(), talker_config=talker, code2wav_config=code2wav
    )
    cfg.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    full = transformers.Qwen3OmniMoeForConditionalGeneration(cfg).eval()
    full.thinker.load_state_dict(thinker.state_dict())
    full.save_pretrained(path)
    for name in os.listdir(thinker_path):
        if name.startswith(("tokenizer", "processor", "chat_template")):
            shutil.copy(os.path.join(thinker_path, name), path)


def test_full_omni_checkpoint_serves_its_thinker(omni, tmp_path, caplog):
    from jaxmm import LLM

    path, hf, processor, _ = omni
    full = str(tmp_path / "full")
    _save_full_checkpoint(full, path, hf)
    with caplog.at_level(logging.INFO, logger="jaxmm.models.qwen3_omni_moe"):
        llm = LLM(full, dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    skipped = [r for r in caplog.records if "talker and code2wav" in r.getMessage()]
    assert len(skipped) == 1
    prompts = [PROMPTS[1], AUDIO_PROMPTS[0]]
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_generate(hf, _hf_inputs(processor, prompt))


def test_chat_parts_render_omni_placeholders(omni):
    """`input_audio` and image chat parts become the released tokenizer's placeholders,
    expanded as in a prompt (the chat path adds no BOS: the template's text is tokenized as
    it is)."""
    from tests.helpers import assert_audio_and_image_chat_parts

    llm = omni[3]
    audio = AUDIO_PROMPTS[0]["multi_modal_data"]["audio"][0]
    assert_audio_and_image_chat_parts(llm, audio, SR, IMAGES[0], (AUD, IMG), _params())


def test_thinker_audio_beside_an_image_matches_transformers(omni):
    """One prompt with an image and a clip: DeepStack at the image's tokens only, TMRoPE
    grid positions for the image and plain ones for the audio."""
    _, hf, processor, llm = omni
    prompt = {
        "prompt": f"Look {IMG} and hear {AUD} then",
        "multi_modal_data": {"image": IMAGES[1], "audio": (_tone(1.3, 600, 4), SR)},
    }
    _check(llm, hf, processor, [prompt], hf.config.audio_token_id)


def test_thinker_video_with_its_audio_matches_transformers(omni):
    """`use_audio_in_video`: a 2.3 s track (30 audio tokens) beside a video of two temporal
    patches at times 0 and 26: video 0, audio 0-25, video 26, audio 26-29. The HF side's
    placeholder is written by the processor's own `replace_video_with_audio_token`."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import (
        _get_feat_extract_output_lengths,
    )

    _, hf, processor, llm = omni
    vid = "<|vision_start|><|video_pad|><|vision_end|>"
    audio = _tone(2.3, 700, 5)
    video = (VIDEO, {"fps": VIDEO_FPS})
    prompts = [
        {"prompt": f"Watch {vid} now", "multi_modal_data": {"video": video}},
        {
            "prompt": f"{IMG} then {vid} and",
            "multi_modal_data": {"image": IMAGES[3], "video": video},
        },
    ]
    for plain in prompts:
        prompt = {
            **plain,
            "multi_modal_data": {**plain["multi_modal_data"], "audio": (audio, SR)},
            "mm_processor_kwargs": {"use_audio_in_video": True},
        }
        out = llm.generate([prompt], _params(), use_tqdm=False)[0]
        inputs = _hf_video_inputs(processor, plain)
        feats = processor.feature_extractor(
            audio,
            sampling_rate=SR,
            padding="longest",
            truncation=False,
            return_attention_mask=True,
            return_tensors="pt",
        )
        n_audio = int(_get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))[0])
        video_inputs = {
            "video_grid_thw": inputs["video_grid_thw"].numpy(),
            "video_second_per_grid": inputs["video_second_per_grid"].tolist(),
        }
        span = processor.replace_video_with_audio_token(
            video_inputs, 0, {"num_audio_tokens": [n_audio]}, 0, position_id_per_seconds=13
        )
        tok = processor.tokenizer
        old = inputs["input_ids"][0].tolist()  # the video's run replaced by the span
        where = [i for i, t in enumerate(old) if t == hf.config.video_token_id]
        new = tok(span, add_special_tokens=False).input_ids
        ids = torch.tensor([old[: where[0]] + new + old[where[-1] + 1 :]])
        inputs.update(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=feats["input_features"],
            feature_attention_mask=feats["attention_mask"],
            use_audio_in_video=True,
        )
        assert span.count(tok.audio_token) == n_audio == 30
        assert out.prompt_token_ids == ids[0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
        with torch.no_grad():
            ref = hf(**inputs).logits[0, -1].numpy()
        np.testing.assert_allclose(_last_logits(llm, prompt), ref, atol=1e-4, rtol=0)
