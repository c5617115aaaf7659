"""Checkpoints load whichever layout their HF processor was saved in.

transformers 5.x `processor.save_pretrained` writes one `processor_config.json` with every
sub-processor nested in it and no `preprocessor_config.json`; 4.x wrote a file per
sub-processor (`preprocessor_config.json`, `video_preprocessor_config.json`) and at most
the processor's own settings in a flat `processor_config.json`
(`tests.helpers.save_processor_separately`). For every multimodal family the same tiny
random model is saved next to its processor both ways, and each layout must give the same
prompt tokens and greedy tokens: LLaVA, Qwen2-VL and Qwen2.5-VL (images, and video through
a video pixel budget of its own, so the video processor's config must be read), Qwen2-Audio
and Whisper (audio feature extractors; these two also against transformers' `generate`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from tests.helpers import (
    link_model_files,
    make_processor,
    make_tokenizer,
    persistent_compilation_cache,
    qwen2_vl_video_processor,
    save_processor_separately,
)
from tests.models.test_vlm_parity import I_QWEN, IMAGES, V_QWEN, VIDEO, VIDEO_FPS, make_vlm

NEW_TOKENS = 4
SR = 16000
LAYOUTS = ("nested", "separate")
# the video processor's pixel budget, smaller than the image processor's (48 * 48), so a
# video's token count tells which config was read
VIDEO_MAX_PIXELS = 16 * 24


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each layout's engine compiles the same programs: the second one reads them back."""
    with persistent_compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
        yield


def _params(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _save_both(root: str, model_dir: str, processor) -> dict[str, str]:
    """{layout: checkpoint dir}: the model's files linked, the processor saved that way."""
    dirs = {}
    for layout in LAYOUTS:
        path = link_model_files(model_dir, os.path.join(root, layout))
        if layout == "nested":
            processor.save_pretrained(path)
        else:
            save_processor_separately(processor, path)
        dirs[layout] = path
    _check_files(dirs, processor.get_attributes())
    return dirs


def _check_files(dirs: dict[str, str], attributes: list[str]) -> None:
    """The two layouts are what they claim to be."""
    subs = [a for a in attributes if a != "tokenizer"]
    nested = os.listdir(dirs["nested"])
    assert "preprocessor_config.json" not in nested
    assert "video_preprocessor_config.json" not in nested
    with open(os.path.join(dirs["nested"], "processor_config.json")) as f:
        nested_config = json.load(f)
    assert all(isinstance(nested_config.get(a), dict) for a in subs)
    separate = os.listdir(dirs["separate"])
    assert "preprocessor_config.json" in separate
    assert ("video_preprocessor_config.json" in separate) == ("video_processor" in subs)
    if "processor_config.json" in separate:
        with open(os.path.join(dirs["separate"], "processor_config.json")) as f:
            assert not any(isinstance(v, dict) for v in json.load(f).values())


def _generate(path: str, prompts: list, **kw) -> list[tuple[list[int], list[int]]]:
    llm = LLM(path, dtype="float32", max_model_len=256, **kw)
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    return [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]


def _generate_with_logprobs(path: str, prompt: dict, **kw) -> tuple[list, list, np.ndarray]:
    """(prompt ids, greedy tokens, their logprobs): the logprobs tell apart inputs that
    differ too little to change a greedy token (pixels normalised otherwise, say)."""
    llm = LLM(path, dtype="float32", max_model_len=256, **kw)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
    return out.prompt_token_ids, tokens, np.array(logprobs)


# ---------------------------------------------------------------------------------------
# Vision-language models


def _tokenizer(model_dir: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def _vlm_processor(arch: str, model_dir: str):
    import transformers

    tok = _tokenizer(model_dir)
    if arch == "llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        return make_processor(
            transformers.LlavaProcessor,
            image_processor=LlavaImageProcessorPil.from_pretrained(model_dir),
            tokenizer=tok,
            patch_size=7,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    cls = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[arch]
    return make_processor(
        getattr(transformers, cls),
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_dir),
        tokenizer=tok,
        video_processor=qwen2_vl_video_processor(
            patch_size=4,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=8 * 8,
            max_pixels=VIDEO_MAX_PIXELS,
        ),
    )


def _video_tokens(max_pixels: int) -> int:
    """Video placeholder tokens of `VIDEO` under a pixel budget, by HF's resize rule."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    T, H, W, _ = VIDEO.shape
    h, w = smart_resize(H, W, factor=8, min_pixels=8 * 8, max_pixels=max_pixels)
    return (T // 2) * (h // 4) * (w // 4) // 4  # tp = 2, patch 4, merge 2 x 2


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_vlm_checkpoints_load_from_either_layout(arch, ckpt_root, tmp_path):
    model_dir = make_vlm(ckpt_root, arch)
    dirs = _save_both(str(tmp_path), model_dir, _vlm_processor(arch, model_dir))
    # one prompt of several items (a few compilations per engine)
    if arch == "llava":
        prompt = {
            "prompt": "The quick <image> brown fox <image> jumps over",
            "multi_modal_data": {"image": IMAGES[2:4]},
        }
    else:
        prompt = {
            "prompt": f"An image {I_QWEN} and a video {V_QWEN} show",
            "multi_modal_data": {"image": IMAGES[0], "video": (VIDEO, {"fps": VIDEO_FPS})},
        }
    kw = dict(max_num_batched_tokens=256, limit_mm_per_prompt={"image": 2, "video": 1})
    outs = {layout: _generate_with_logprobs(path, prompt, **kw) for layout, path in dirs.items()}
    assert outs["nested"][:2] == outs["separate"][:2]
    np.testing.assert_allclose(outs["nested"][2], outs["separate"][2], atol=1e-5, rtol=0)
    if arch != "llava":
        # the video's placeholder count follows the video processor's own pixel budget
        pad = _tokenizer(model_dir).convert_tokens_to_ids("<|video_pad|>")
        n = outs["nested"][0].count(pad)
        assert n == _video_tokens(VIDEO_MAX_PIXELS) != _video_tokens(48 * 48)


# ---------------------------------------------------------------------------------------
# Audio: Qwen2-Audio and Whisper


def _tone(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * noise).astype(np.float32)


def _randomize(model) -> None:
    """Larger-than-default weights so greedy paths are not ties."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)


def test_qwen2_audio_checkpoints_load_from_either_layout(tmp_path):
    from transformers import (
        AutoProcessor,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    model_dir = str(tmp_path / "model")
    tok = make_tokenizer(model_dir)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]}
    )
    config = Qwen2AudioConfig(
        audio_config=dict(
            num_mel_bins=16,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=32,
            d_model=16,
            max_source_positions=100,  # 200 mel frames: the 2 s window
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    _randomize(model)
    model.save_pretrained(model_dir)
    fe = WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)
    dirs = _save_both(str(tmp_path), model_dir, processor)

    audio = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    prompts = [(f"First {audio} then {audio}", [_tone(1.9, 900, 1), _tone(0.7, 300, 0)])]
    for layout, path in dirs.items():
        ref = []
        hf_processor = AutoProcessor.from_pretrained(path)  # transformers reads it too
        for text, clips in prompts:
            x = hf_processor(text=text, audio=clips, sampling_rate=SR, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
                )
            ref.append((x["input_ids"][0].tolist(), out[0, x["input_ids"].shape[1] :].tolist()))
        mm = [
            {"prompt": t, "multi_modal_data": {"audio": [(c, SR) for c in cs]}} for t, cs in prompts
        ]
        assert _generate(path, mm, max_num_batched_tokens=256) == ref, layout


def test_whisper_checkpoints_load_from_either_layout(tmp_path):
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    V, START, EOS = 96, 1, 2
    model_dir = str(tmp_path / "model")
    config = WhisperConfig(
        architectures=["WhisperForConditionalGeneration"],
        vocab_size=V,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=100,  # a 2 s window: 200 mel frames
        max_target_positions=32,
        pad_token_id=EOS,
        bos_token_id=START,
        eos_token_id=EOS,
        decoder_start_token_id=START,
        begin_suppress_tokens=None,
        init_std=0.4,  # large enough for varied greedy output
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=START,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=START,
        max_length=32,
        no_timestamps_token_id=V - 1,
        is_multilingual=False,
        return_timestamps=False,
    )
    model.save_pretrained(model_dir)
    fe = WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    # WhisperProcessor takes any fast tokenizer; the engine runs without one here
    processor = WhisperProcessor(feature_extractor=fe, tokenizer=make_tokenizer(model_dir))
    dirs = _save_both(str(tmp_path), model_dir, processor)

    clips = [_tone(0.6, 300, 0), _tone(1.7, 1100, 1)]
    features = fe(clips, sampling_rate=SR, return_tensors="pt").input_features
    with torch.no_grad():
        out = model.generate(features, do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS)
    ref = [r.tolist() for r in out]  # the tokens after the decoder prompt
    ref = [r[: r.index(EOS) + 1] if EOS in r else r for r in ref]
    prompts = [{"prompt": "", "multi_modal_data": {"audio": (c, SR)}} for c in clips]
    for layout, path in dirs.items():
        llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_num_seqs=2)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
        assert [o.outputs[0].token_ids for o in outs] == ref, layout
