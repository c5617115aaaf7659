"""LLaVA-OneVision parity with transformers on a tiny random checkpoint, float32.

The checkpoint (SigLIP tower, Qwen2 text model) is saved with `save_pretrained` next to its
`LlavaOnevisionProcessor` (image processor with small `image_grid_pinpoints`, video
processor, tokenizer with `<image>` / `<video>`), as transformers writes them. The pinpoints
and `anyres_max_2` make the prompts cover every packing path: a square image whose 2x2 tiles
are shrunk bilinearly, a non-square one cropped to the image and shrunk, two images in one
prompt (one padded tile each, no tiling), a video (frames pooled 4x4 -> 2x2), and a video
followed by a tall image (3x1 tiles, cropped, not shrunk).

The HF side gets its inputs from HF's own processor; its video processor needs torchvision,
so without it the video's pixels come from torch here (the uint8 antialiased resize and the
fused normalisation HF's video processor calls) and its token count from the processor.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_processor, make_tokenizer

NEW_TOKENS = 8
TILE = 28  # tower input size; patch 7 -> 4x4 patches per tile
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
ASPECT = "anyres_max_2"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 255, (h // 4 + 1, w // 4 + 1, 3), np.uint8)  # blocky, not noise
    return Image.fromarray(base).resize((w, h), Image.NEAREST)


SQUARE = _image(60, 60, 0)  # 2x2 tiles, 8x8 patches -> shrunk to 5x5
WIDE = _image(40, 50, 1)  # 2x2 tiles, rows cropped to 6x8 -> shrunk to 4x6
TALL = _image(90, 30, 2)  # 3x1 tiles
VIDEO = np.stack([np.asarray(_image(36, 44, 10 + i)) for i in range(3)])  # resized to 28x28

PROMPTS = [
    {"prompt": "<image>\nDescribe the image.", "multi_modal_data": {"image": SQUARE}},
    {"prompt": "Hello <image> what is this", "multi_modal_data": {"image": WIDE}},
    {
        "prompt": "The quick <image> brown fox <image> jumps",
        "multi_modal_data": {"image": [TALL, WIDE]},
    },
    {"prompt": "Video: <video> what happens", "multi_modal_data": {"video": VIDEO}},
    {  # one image with a video: the image is tiled
        "prompt": "A <video> then <image> which",
        "multi_modal_data": {"image": TALL, "video": VIDEO},
    },
]


def _randomize(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)


def _processor(path_or_tok):
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    return make_processor(
        LlavaOnevisionProcessor,
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
        ),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}),
        tokenizer=path_or_tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ASPECT,
    )


def make_onevision(root: str, seed: int = 0) -> str:
    import transformers

    path = os.path.join(root, "llava_onevision")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=7,
        vision_use_head=False,
    )
    text = transformers.Qwen2Config(
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
    )
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=ASPECT,
    )
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    _processor(tok).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------
# The HF side


def _hf_video_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, S, S): what HF's video processor computes, from torch."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    x = torch.nn.functional.interpolate(
        x, size=(TILE, TILE), mode="bicubic", antialias=True, align_corners=False
    )
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]) * (1.0 / (1 / 255))
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]) * (1.0 / (1 / 255))
    return (x.float() - mean[:, None, None]) / std[:, None, None]


def _hf_inputs(path: str, prompt: dict) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    proc = _processor(tok)
    data = prompt["multi_modal_data"]
    text, kw = prompt["prompt"], {}
    if "image" in data:
        images = data["image"] if isinstance(data["image"], list) else [data["image"]]
        kw["images"] = [images]  # one sample: its images are one prompt's
    frames = data.get("video")
    if frames is not None and HAS_TORCHVISION:
        kw["videos"] = [frames]
    elif frames is not None:  # a marker token for the processor, expanded after
        text = text.replace("<video>", "<|system|>")
    if kw:
        out = dict(proc(text=text, return_tensors="pt", **kw))
    else:
        ids = torch.tensor([tok(text).input_ids])
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if frames is not None and not HAS_TORCHVISION:  # the processor's count, torch's pixels
        n = proc._get_num_multimodal_tokens(video_sizes=[frames.shape[:3]])["num_video_tokens"][0]
        ids = []
        for t in out["input_ids"][0].tolist():
            marker = t == tok.convert_tokens_to_ids("<|system|>")
            ids.extend([tok.convert_tokens_to_ids("<video>")] * n if marker else [t])
        out["input_ids"] = torch.tensor([ids])
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        out["pixel_values_videos"] = _hf_video_pixels(frames)[None]
    return out


def _hf_generate(model, inputs: dict) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# ---------------------------------------------------------------------------------------
# Tests


def test_token_counts_and_pixels_match_the_hf_processor(tmp_path):
    """Host side alone: tiling, crop and anyres_max counts, the multi-image tile, video
    pixels, against HF's processor for images of many shapes."""
    from jaxmm.multimodal import anyres

    tok = make_tokenizer(str(tmp_path))
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    proc = _processor(tok)
    ip, image_id = proc.image_processor, tok.convert_tokens_to_ids("<image>")
    resized = 0
    sizes = [(28, 28), (60, 60), (40, 50), (20, 70), (90, 30), (33, 47), (15, 100), (101, 57)]
    for i, (h, w) in enumerate(sizes):
        img = _image(h, w, i)
        ref = proc(text="a <image> b", images=[img], return_tensors="np")
        assert anyres._fast_settings(ip, {}, img) is not None  # Pillow + byte table, not HF
        ours = anyres.process_image(ip, img, {})
        assert ours["pixel_values"].dtype == np.uint8  # bytes: their values come on device
        np.testing.assert_array_equal(anyres.pixel_values(ours), ref["pixel_values"][0])
        hf = anyres.process_image(ip, img, {}, fast=False)
        np.testing.assert_array_equal(hf["pixel_values"], ref["pixel_values"][0])
        layout = anyres.tile_layout(ours["image_size"], PINPOINTS, TILE, 4, ASPECT)
        assert layout.num_tiles == len(ours["pixel_values"])
        assert layout.num_tokens == int((ref["input_ids"] == image_id).sum())
        resized += layout.resized
        both = proc(text="<image><image>", images=[[img, SQUARE]], return_tensors="np")
        single = anyres.process_image(ip, img, {anyres.MULTI_IMAGE: True})
        np.testing.assert_array_equal(anyres.pixel_values(single), both["pixel_values"][0][:1])
        slow = anyres.process_image(ip, img, {anyres.MULTI_IMAGE: True}, fast=False)
        np.testing.assert_array_equal(slow["pixel_values"], both["pixel_values"][0][:1])
        assert 2 * anyres.single_tile_tokens(4) == int((both["input_ids"] == image_id).sum())
    assert 0 < resized < len(sizes)  # both kinds of layout were checked
    settings = anyres.video_settings(proc.video_processor.to_dict())
    pixels = anyres.pixel_values(anyres.process_video(VIDEO, settings))
    np.testing.assert_allclose(pixels, _hf_video_pixels(VIDEO).numpy(), atol=1e-6, rtol=0)
    n = proc._get_num_multimodal_tokens(video_sizes=[VIDEO.shape[:3]])["num_video_tokens"][0]
    assert anyres.video_tokens(len(VIDEO), 4) == n


def test_bilinear_matrix_is_torch_interpolate():
    from jaxmm.multimodal import anyres

    x = torch.randn(1, 2, 9, 7, generator=torch.Generator().manual_seed(0))
    for rows, cols in [(5, 4), (6, 6), (3, 2), (9, 7)]:
        ref = torch.nn.functional.interpolate(x, size=[rows, cols], mode="bilinear")[0]
        mh, mw = anyres.bilinear_matrix(9, rows), anyres.bilinear_matrix(7, cols)
        ours = np.einsum("rh,chw,qw->crq", mh, x[0].numpy(), mw)
        # float32 sums in another order than torch's: a few ulps of values up to ~4
        np.testing.assert_allclose(ours, ref.numpy(), atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def onevision(ckpt_root):
    import transformers

    from jaxmm import LLM

    path = make_onevision(ckpt_root)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 2, "video": 1},
    )
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32
    ).eval()
    return path, llm, hf


def test_greedy_and_logits_match_transformers(onevision):
    from jaxmm import SamplingParams
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from jaxmm.runner.model_runner import SeqStep

    path, llm, hf = onevision
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    hf_inputs = [_hf_inputs(path, p) for p in PROMPTS]
    for out, inputs in zip(outs, hf_inputs):
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model

    # last-token logits, the prompt prefilled in chunks of 24 tokens so that image spans
    # straddle steps (scratch pages at the top of the pool; the engine is idle)
    engine = llm.llm_engine
    runner = engine.runner
    rows = []
    for p in PROMPTS:
        _, ids, mm = prepare_multimodal_prompt(engine, p)
        n = math.ceil(len(ids) / runner.block_size)
        pages = list(range(runner.num_pages - n, runner.num_pages))
        rows_of = {}
        for it in mm.items:
            entry = engine.encoder_cache.get(it.cache_key) or engine.encoder_cache.allocate(
                it.cache_key, it.end - it.start, "t"
            )
            rows_of[it.cache_key] = entry.rows
            runner.encode([(it.modality, it.data, entry.rows)])
        for start in range(0, len(ids), 24):
            chunk = ids[start : start + 24]
            step = SeqStep(chunk, start, pages, sample=start + len(chunk) == len(ids))
            mm.fill_step(step, None, start, len(chunk))
            step.mm_rows = [
                (max(it.start, start) - start, rows_of[it.cache_key][a - it.start : b - it.start])
                for it in mm.items
                for a, b in [(max(it.start, start), min(it.end, start + len(chunk)))]
                if a < b
            ]
            last = runner.logits([step])[0]
        rows.append(last)
    with torch.no_grad():
        ref = np.stack([hf(**inputs).logits[0, -1].numpy() for inputs in hf_inputs])
    np.testing.assert_allclose(np.stack(rows), ref, atol=1e-4, rtol=0)


def test_images_batched_in_tower_calls_give_each_one_s_features(onevision, monkeypatch):
    """Tiled and single-tile images share tower calls (split by tile count, never inside an
    item, and by the kind of pixels): each item's rows equal those of a call of its own."""
    from jaxmm.models import llava_onevision
    from jaxmm.multimodal import anyres

    _, llm, _ = onevision
    runner = llm.llm_engine.runner
    ip = llm.llm_engine.mm_frontend().processor.image_processor
    items = [
        anyres.process_image(ip, WIDE, {}),
        anyres.process_image(ip, SQUARE, {anyres.MULTI_IMAGE: True}),
        anyres.process_image(ip, TALL, {}),
        anyres.process_image(ip, SQUARE, {}),
        anyres.process_image(ip, TALL, {}, fast=False),  # float32 pixels: a call of its own
    ]
    alone = []
    for it in items:
        encode = runner.model_obj.mm_encoder(runner.graphdef)
        alone.append(np.asarray(encode(runner.params, "image", [it])[0]))
    for max_tiles in (40, 6):  # 15 byte tiles in one call or three (5 + 1 | 4 | 5); 4 floats
        monkeypatch.setattr(llava_onevision, "MAX_TILES_PER_CALL", max_tiles)
        encode = runner.model_obj.mm_encoder(runner.graphdef)
        together = encode(runner.params, "image", items)
        assert len({id(r.array) for r in together}) == len(items)  # packed per item
        for rows, want in zip(together, alone):
            np.testing.assert_allclose(np.asarray(rows), want, atol=1e-5, rtol=0)


def test_precomputed_embeddings_give_the_same_tokens(onevision):
    """HF's packed image features (tiles, crop, shrink, newlines) as an embeddings item."""
    from jaxmm import SamplingParams

    path, llm, hf = onevision
    prompt = PROMPTS[1]
    inputs = _hf_inputs(path, prompt)
    with torch.no_grad():
        feats = hf.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=[1]
        ).pooler_output[0]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    embeds = {"prompt": prompt["prompt"], "multi_modal_data": {"image": feats}}
    pixels, from_embeds = llm.generate([prompt, embeds], params, use_tqdm=False)
    assert from_embeds.prompt_token_ids == pixels.prompt_token_ids
    assert from_embeds.outputs[0].token_ids == pixels.outputs[0].token_ids
    with pytest.raises(ValueError, match=r"hidden_size=64.*got \(5, 32\)"):
        bad = {"prompt": prompt["prompt"], "multi_modal_data": {"image": np.zeros((5, 32))}}
        llm.generate([bad], params, use_tqdm=False)


def test_images_listed_flat_to_hf_are_each_tiled_with_the_prompt_option(onevision):
    """transformers' processor tiles each image of a flat list (`batch_num_images` all 1);
    `mm_processor_kwargs={"multi_image": False}` asks jaxmm for the same."""
    from transformers import AutoTokenizer

    from jaxmm import SamplingParams

    path, llm, hf = onevision
    text = "Two <image> and <image> here"
    inputs = dict(
        _processor(AutoTokenizer.from_pretrained(path))(
            text=text, images=[WIDE, SQUARE], return_tensors="pt"
        )
    )
    assert inputs["batch_num_images"].tolist() == [1, 1]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompt = {
        "prompt": text,
        "multi_modal_data": {"image": [WIDE, SQUARE]},
        "mm_processor_kwargs": {"multi_image": False},
    }
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert out.outputs[0].token_ids == _hf_generate(hf, inputs)


def test_chat_parts_give_the_generate_prompt(onevision):
    """An image part and a video part (frames) render to the placeholders `generate` takes."""
    from jaxmm import SamplingParams

    _, llm, _ = onevision
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_pil", "image_pil": WIDE},
                {"type": "text", "text": "What is this?"},
                {"type": "video", "video": VIDEO},
            ],
        }
    ]
    chat = llm.chat(messages, params, use_tqdm=False)[0]
    text = "<|user|><image>\nWhat is this?<video>\n<|end|><|assistant|>"
    ids = llm.get_tokenizer()(text, add_special_tokens=False).input_ids
    data = {"image": WIDE, "video": VIDEO}
    direct = llm.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": data}], params, use_tqdm=False
    )[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    video = llm.get_tokenizer().convert_tokens_to_ids("<video>")
    assert chat.prompt_token_ids.count(video) == 3 * 2 * 2 + 1  # pooled frames + newline


def test_hub_and_transformers5_weight_names_load_the_same_model(onevision, tmp_path):
    """The same weights under the hub's names (`vision_tower.vision_model.*`) and
    transformers 5's module names (`model.language_model.*`, `model.image_newline`,
    `lm_head.*`) give the same tokens."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from jaxmm import LLM, SamplingParams

    path, llm, _ = onevision
    tensors = load_file(os.path.join(path, "model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("vision_tower."):
            key = "model.vision_tower.vision_model." + key.removeprefix("vision_tower.")
        elif key.startswith("language_model.model."):
            key = "model.language_model." + key.removeprefix("language_model.model.")
        elif key.startswith("language_model.lm_head."):
            key = key.removeprefix("language_model.")
        else:
            key = "model." + key
        renamed[key] = value
    assert "model.image_newline" in renamed and "lm_head.weight" in renamed
    for name in os.listdir(path):
        if name != "model.safetensors":
            shutil.copy(os.path.join(path, name), tmp_path / name)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    other = LLM(str(tmp_path), dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    want = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert other.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids == want
