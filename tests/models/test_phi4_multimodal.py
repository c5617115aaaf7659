"""Phi-4-multimodal parity with transformers on a tiny random checkpoint (float32).

The checkpoint is `Phi4MultimodalForCausalLM` as transformers saves it (fused qkv /
gate_up, LongRoPE with partial rotary, the audio conformer and the image tower), with a
locally trained tokenizer holding `<|image|>` / `<|audio|>` and the model's own
`Phi4MultimodalFeatureExtractor` (saved with its `save_pretrained`; the full processor
cannot be built here: its image processor needs torchvision, so the HF side expands the
audio placeholders as `Phi4MultimodalProcessor.replace_audio_token` does, from the feature
extractor's `audio_embed_sizes`). Text and audio prompts must give `generate`'s greedy
tokens, last-token logits within 1e-4, and the spliced audio rows must equal HF's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import make_tokenizer

NEW_TOKENS = 10
SR = 16000
AUD = "<|audio|>"
IMG = "<|image|>"
IMAGE_PROCESSOR = {
    "image_processor_type": "Phi4MultimodalImageProcessor",
    "size": {"height": 64, "width": 64},
    "patch_size": 2,
    "dynamic_hd": 4,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "rescale_factor": 1 / 255,
}


def _tone(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * noise).astype(np.float32)


def _config(tok):
    import transformers

    rng = np.random.default_rng(0)
    R = 12  # rotary dims: head_dim 16 * partial_rotary_factor 0.75
    return transformers.Phi4MultimodalConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,  # LongRoPE's attention factor: 4x the original
        original_max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [float(x) for x in 1 + rng.random(R // 2)],
            "long_factor": [float(x) for x in 2 + rng.random(R // 2)],
            "original_max_position_embeddings": 4096,
        },
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        vision_config=dict(  # 32 x 32 patches a crop: 16 x 16 pooled, as the real tower
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=2,
            crop_size=64,
            image_token_id=tok.convert_tokens_to_ids("<|image|>"),
        ),
        audio_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_blocks=2,
            num_attention_heads=4,
            ext_pw_out_channel=32,
            depthwise_separable_out_channel=32,
            nemo_conv_channels=16,
            chunk_size=4,  # a streaming mask of 4-frame chunks, 2 chunks back
            left_chunk=2,
            bias_max_distance=40,
            audio_token_id=tok.convert_tokens_to_ids("<|audio|>"),
        ),
    )


@pytest.fixture(scope="module")
def phi4mm(tmp_path_factory):
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

    path = str(tmp_path_factory.mktemp("phi4mm"))
    tok = make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>", "<|audio|>"]})
    tok.save_pretrained(path)
    Phi4MultimodalFeatureExtractor().save_pretrained(path)
    # transformers' processor_config.json layout, written by hand: its image processor
    # class needs torchvision to be built (and saved)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"image_processor": IMAGE_PROCESSOR}, f)
    config = _config(tok)
    config.architectures = ["Phi4MultimodalForCausalLM"]
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(config)
    # the image tower's bidirectional attention (transformers' SDPA path runs an unpadded
    # crop causally; see jaxmm/models/encoders/phi4mm_vision.py)
    model.set_attn_implementation("eager")
    with torch.no_grad():  # larger-than-default init so greedy paths are not ties
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif "norm" not in name:
                p.normal_(0, 0.05)
        enc = model.model.embed_tokens_extend.audio_embed.encoder.encoder_embedding
        enc.global_mean.normal_(0, 1.0)  # a buffer, saved with the weights
        enc.global_invstd.uniform_(0.05, 0.2)
    model.eval().save_pretrained(path)
    return path, model, tok


def _hf(model, input_ids, **extra):
    """HF's greedy tokens and last prompt-token logits for one prompt."""
    x = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            **extra,
        )
        logits = model(input_ids=x, **extra).logits[0, -1].numpy()
    return out[0, len(input_ids) :].tolist(), logits


def _check(path, prompts, refs):
    from jaxmm import LLM, SamplingParams
    from tests.models.test_qwen2_5_omni import _last_logits

    llm = LLM(
        path, dtype="float32", max_model_len=2048, max_num_batched_tokens=256, enable_mm_embeds=True
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, (ids, tokens, _) in zip(outs, refs):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == tokens
    # the prompts lead to different tokens: not a degenerate model
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(outs)
    for prompt, (_, _, logits) in zip(prompts, refs):
        np.testing.assert_allclose(_last_logits(llm, prompt), logits, atol=1e-4, rtol=0)
    return llm


def test_phi4mm_text_matches_transformers(phi4mm):
    path, model, tok = phi4mm
    prompts = [{"prompt": "Hello, my name is"}, {"prompt": "The capital of France is Paris. The"}]
    refs = []
    for p in prompts:
        ids = tok(p["prompt"]).input_ids
        refs.append((ids, *_hf(model, ids)))
    _check(path, prompts, refs)


def _hf_audio_inputs(path, tok, text: str, clips: list[np.ndarray]) -> tuple[list[int], dict]:
    """Prompt ids with each `<|audio|>` expanded to its clip's `audio_embed_sizes` (as
    `Phi4MultimodalProcessor.replace_audio_token` does) + the feature extractor's tensors."""
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(path)
    feats = fe(clips, sampling_rate=SR, return_tensors="pt")
    sizes = feats["audio_embed_sizes"].tolist()
    audio = tok.convert_tokens_to_ids(AUD)
    ids, i = [], 0
    for t in tok(text).input_ids:
        ids.extend([audio] * sizes[i] if t == audio else [t])
        i += t == audio
    return ids, dict(feats)


def test_phi4mm_audio_matches_transformers(phi4mm):
    """A 2.5 s clip (32 encoder frames over 8 chunks of the streaming mask) and two clips
    of one length in a prompt (HF pads nothing then): tokens, logits and audio rows."""
    path, model, tok = phi4mm
    prompts = [
        {"prompt": f"{AUD}What is it?", "multi_modal_data": {"audio": (_tone(2.5, 300, 0), SR)}},
        {
            "prompt": f"First {AUD} then {AUD} compare",
            "multi_modal_data": {"audio": [(_tone(1.2, 900, 1), SR), (_tone(1.2, 500, 2), SR)]},
        },
    ]
    refs, rows = [], []
    for p in prompts:
        clips = p["multi_modal_data"]["audio"]
        clips = [c[0] for c in (clips if isinstance(clips, list) else [clips])]
        ids, feats = _hf_audio_inputs(path, tok, p["prompt"], clips)
        refs.append((ids, *_hf(model, ids, **feats)))
        embed = model.model.embed_tokens_extend.audio_embed
        with torch.no_grad():
            h = embed.encoder(feats["audio_input_features"], feats.get("audio_attention_mask"))
            h = embed.down_proj_for_speech(torch.nn.functional.gelu(embed.up_proj_for_speech(h)))
        rows.append([h[i, :n].numpy() for i, n in enumerate(feats["audio_embed_sizes"])])
    llm = _check(path, prompts, refs)

    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    engine = llm.llm_engine
    for p, ref_rows in zip(prompts, rows):
        _, _, mm = prepare_multimodal_prompt(engine, p)
        assert [it.end - it.start for it in mm.items] == [len(r) for r in ref_rows]
        for item, ref in zip(mm.items, ref_rows):
            scratch = np.arange(len(ref), dtype=np.int32)
            engine.runner.encode([("audio", item.data, scratch)])
            ours = np.asarray(engine.runner.encoder_cache)[scratch]
            np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # HF's rows given as precomputed embeddings: the same tokens as the audio itself
    from jaxmm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    embeds = [
        {"prompt": p["prompt"], "multi_modal_data": {"audio": [{"audio_embeds": r} for r in rr]}}
        for p, rr in zip(prompts, rows)
    ]
    outs = llm.generate(embeds, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r[1] for r in refs]
    with pytest.raises(ValueError, match="hidden_size"):
        llm.generate(
            {"prompt": AUD, "multi_modal_data": {"audio": {"audio_embeds": rows[0][0][:, :8]}}},
            params,
            use_tqdm=False,
        )


def _image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
    noise = rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _hf_image_inputs(tok, text: str, images: list) -> tuple[list[int], dict]:
    """Prompt ids with each `<|image|>` expanded to its image's `num_img_tokens` (as
    `Phi4MultimodalProcessor.replace_image_token` does) + the image tensors, crops padded
    to the prompt's most as transformers' processor pads them (blank crops, full masks).
    The pixels are jaxmm's: transformers' image processor needs torchvision."""
    from jaxmm.models.encoders import phi4mm_image

    items = [phi4mm_image.preprocess(im, phi4mm_image.settings(IMAGE_PROCESSOR)) for im in images]
    crops = max(len(it["image_pixel_values"]) for it in items)
    pixels = np.zeros((len(items), crops, 3, 64, 64), np.float32)
    masks = np.ones((len(items), crops, 32, 32), np.int64)
    for i, it in enumerate(items):
        n = len(it["image_pixel_values"])
        pixels[i, :n], masks[i, :n] = it["image_pixel_values"], it["image_attention_mask"]
    image = tok.convert_tokens_to_ids(IMG)
    ids, i = [], 0
    for t in tok(text).input_ids:
        ids.extend([image] * items[i]["num_img_tokens"] if t == image else [t])
        i += t == image
    tensors = {
        "image_pixel_values": torch.from_numpy(pixels),
        "image_sizes": torch.tensor([it["image_size"] for it in items]),
        "image_attention_mask": torch.from_numpy(masks),
    }
    return ids, tensors


def test_phi4mm_images_match_transformers(phi4mm):
    """One image of 2 x 2 crops with white padding masked, and two images of other grids in
    a prompt (1 x 1; 2 x 2 from the aspect-ratio search past dynamic_hd): tokens, logits."""
    path, model, tok = phi4mm
    prompts = [
        {"prompt": f"{IMG}Describe the image.", "multi_modal_data": {"image": _image(70, 100, 0)}},
        {
            "prompt": f"Hello {IMG} and {IMG} what",
            "multi_modal_data": {"image": [_image(50, 60, 1), _image(150, 140, 2)]},
        },
    ]
    refs = []
    for p in prompts:
        images = p["multi_modal_data"]["image"]
        images = images if isinstance(images, list) else [images]
        ids, tensors = _hf_image_inputs(tok, p["prompt"], images)
        refs.append((ids, *_hf(model, ids, **tensors)))
    _check(path, prompts, refs)


@pytest.mark.parametrize("size", [(70, 100), (150, 140), (300, 33), (1000, 120)])
def test_phi4mm_image_pixels_match_transformers_processor(size):
    """jaxmm's HD crops equal `Phi4MultimodalImageProcessor`'s (which needs torchvision:
    without it this cannot be compared, and is skipped)."""
    pytest.importorskip("torchvision")
    from transformers import Phi4MultimodalImageProcessor

    from jaxmm.models.encoders import phi4mm_image

    keys = ("size", "patch_size", "dynamic_hd")
    hf = Phi4MultimodalImageProcessor(**{k: IMAGE_PROCESSOR[k] for k in keys})
    image = _image(*size, seed=3)
    ref = hf(images=[image], return_tensors="np")
    ours = phi4mm_image.preprocess(image, phi4mm_image.settings(hf.to_dict()))
    n = len(ours["image_pixel_values"])
    assert ours["num_img_tokens"] == int(ref["num_img_tokens"][0])
    assert tuple(ours["image_size"]) == tuple(ref["image_sizes"][0])
    np.testing.assert_array_equal(ours["image_attention_mask"], ref["image_attention_mask"][0][:n])
    np.testing.assert_allclose(
        ours["image_pixel_values"], ref["image_pixel_values"][0][:n], atol=1e-6
    )


def test_phi4mm_image_and_audio_match_transformers(phi4mm):
    """An image and a clip in one prompt: the audio takes the vision-speech projection, as
    in transformers (tokens, logits); the same clip alone keeps the speech one."""
    path, model, tok = phi4mm
    image, clip = _image(50, 60, 4), _tone(1.2, 700, 5)
    prompt = {
        "prompt": f"Look {IMG} and hear {AUD} then",
        "multi_modal_data": {"image": image, "audio": (clip, SR)},
    }
    ids, tensors = _hf_image_inputs(tok, prompt["prompt"].replace(AUD, ""), [image])
    audio_ids, feats = _hf_audio_inputs(path, tok, f"{AUD}", [clip])
    # the audio placeholder run goes where the prompt has it: between "hear" and " then"
    rest = tok(" then").input_ids[1:]
    assert ids[-len(rest) :] == rest
    ids = ids[: -len(rest)] + audio_ids[1:] + rest
    assert ids.count(tok.convert_tokens_to_ids(AUD)) == int(feats["audio_embed_sizes"][0])
    # each run of placeholder tokens collapsed to one: the prompt as tokenized
    marks = {tok.convert_tokens_to_ids(IMG), tok.convert_tokens_to_ids(AUD)}
    runs = [t for i, t in enumerate(ids) if t not in marks or i == 0 or ids[i - 1] != t]
    assert runs == tok(prompt["prompt"]).input_ids
    ref = _hf(model, ids, **tensors, **feats)
    llm = _check(path, [prompt], [(ids, *ref)])

    # the vision-speech pair is not the speech one: the clip alone gives other rows
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    engine = llm.llm_engine
    _, _, mixed = prepare_multimodal_prompt(engine, prompt)
    _, _, alone = prepare_multimodal_prompt(
        engine, {"prompt": AUD, "multi_modal_data": {"audio": (clip, SR)}}
    )
    (audio_item,) = [it for it in mixed.items if it.modality == "audio"]
    assert audio_item.key != alone.items[0].key
    assert audio_item.data["audio_projection"] == "vision"
    assert alone.items[0].data["audio_projection"] == "speech"


def test_phi4mm_ttft_benchmark_smoke(tmp_path, capsys):
    """benchmarks/phi4mm_ttft.py end to end at a tiny shape (not a timing)."""
    from benchmarks import phi4mm_ttft

    argv = ["--config", "small", "--iters", "1", "--device", "cpu", "--seconds", "1"]
    results = phi4mm_ttft.main(argv + ["--size", "96", "--workdir", str(tmp_path)])
    assert [r["modality"] for r in results] == ["image", "audio"]
    for r in results:
        assert r["num_prompt_tokens"] > r["num_mm_tokens"] > 0
        assert r["e2e_s"] > 0 and r["hf_e2e_s"] > 0 and "hf_error" not in r
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["modality"] for x in lines] == ["image", "audio"]
