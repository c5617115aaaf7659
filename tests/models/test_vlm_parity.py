"""VLM parity with transformers on tiny random checkpoints: greedy tokens and logits, float32.

LLaVA-1.5 (CLIP tower, feature layer -2, "default" strategy), Qwen2-VL and Qwen2.5-VL
(window attention, M-RoPE, video with second_per_grid_ts). Each checkpoint is saved with
`save_pretrained` next to a tokenizer with the image tokens added and a chat template with
image placeholders. The HF side gets its inputs independently: LLaVA through HF's
`LlavaProcessor`; Qwen through the HF image processor and a placeholder expansion written
here (HF's Qwen2VLProcessor needs torchvision, which the test environment does not have).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_tokenizer

NEW_TOKENS = 10
I_QWEN = "<|vision_start|><|image_pad|><|vision_end|>"
V_QWEN = "<|vision_start|><|video_pad|><|vision_end|>"

LLAVA_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ---------------------------------------------------------------------------------------
# Tiny checkpoints


def _randomize(model, seed: int) -> None:
    """Larger-than-default weights so greedy paths are not dominated by ties."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)


def _text_config(tok) -> dict:
    return dict(
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


def make_llava(root: str, seed: int = 0) -> str:
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    path = os.path.join(root, "llava")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = LLAVA_TEMPLATE
    tok.save_pretrained(path)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,  # 16 patches -> 16 image tokens ("default" drops CLS)
        projection_dim=16,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    LlavaImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    ).save_pretrained(path)
    return path


def make_qwen(root: str, arch: str, seed: int = 0) -> str:
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = os.path.join(root, arch)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(path)
    ids = dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    text = dict(_text_config(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    common = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=4)
    if arch == "qwen2_vl":
        vision = dict(common, depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    else:
        vision = dict(
            common,
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            window_size=16,  # 2x2 merged patches per window
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        )
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    _randomize(model.eval(), seed)
    model.save_pretrained(path)
    Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=48 * 48
    ).save_pretrained(path)
    return path


def make_vlm(root: str, arch: str) -> str:
    return make_llava(root) if arch == "llava" else make_qwen(root, arch, seed=1)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 255, (h // 4 + 1, w // 4 + 1, 3), np.uint8)  # blocky, not pure noise
    return Image.fromarray(base).resize((w, h), Image.NEAREST)


IMAGES = [_image(40, 50, 0), _image(28, 28, 1), _image(33, 47, 2), _image(16, 24, 3)]
VIDEO = np.stack([np.asarray(_image(24, 40, 10 + i)) for i in range(4)])
VIDEO_FPS = 1.0  # Qwen2.5-VL: 2 s per temporal patch -> positions advance 4 per patch


TEXT_ONLY = {"prompt": "Once upon a time there was"}  # shares steps with the media prompts


def prompts_for(arch: str) -> list[dict]:
    if arch == "llava":
        return [
            TEXT_ONLY,
            {"prompt": "<image>\nDescribe the image.", "multi_modal_data": {"image": IMAGES[0]}},
            {"prompt": "Hello <image> what is this", "multi_modal_data": {"image": IMAGES[1]}},
            {
                "prompt": "The quick <image> brown fox <image> jumps over",
                "multi_modal_data": {"image": [IMAGES[2], IMAGES[3]]},
            },
        ]
    return [
        TEXT_ONLY,
        {"prompt": f"{I_QWEN}Describe the image.", "multi_modal_data": {"image": IMAGES[0]}},
        {
            "prompt": f"Hello {I_QWEN} and {I_QWEN} what",
            "multi_modal_data": {"image": [IMAGES[1], IMAGES[2]]},
        },
        {
            "prompt": f"Video: {V_QWEN} what happens",
            "multi_modal_data": {"video": (VIDEO, {"fps": VIDEO_FPS})},
        },
        {"prompt": f"The {I_QWEN} quick brown fox", "multi_modal_data": {"image": IMAGES[3]}},
    ]


# ---------------------------------------------------------------------------------------
# The HF side


def _hf_model(path: str, arch: str):
    import transformers

    cls = {
        "llava": transformers.LlavaForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }[arch]
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _hf_inputs(path: str, arch: str, prompt: dict, tok) -> dict:
    """HF model inputs for one prompt, built without jaxmm."""
    if "multi_modal_data" not in prompt:
        ids = torch.tensor([tok(prompt["prompt"]).input_ids])
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    data = prompt["multi_modal_data"]
    if arch == "llava":
        import transformers
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        proc = transformers.LlavaProcessor(
            image_processor=LlavaImageProcessorPil.from_pretrained(path),
            tokenizer=tok,
            patch_size=7,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        images = data["image"] if isinstance(data["image"], list) else [data["image"]]
        return dict(proc(text=prompt["prompt"], images=images, return_tensors="pt"))
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ip = Qwen2VLImageProcessorPil.from_pretrained(path)
    kw: dict = {}
    counts = {"<|image_pad|>": [], "<|video_pad|>": []}
    if "image" in data:
        images = data["image"] if isinstance(data["image"], list) else [data["image"]]
        out = ip(images=images, return_tensors="np")
        kw["pixel_values"] = torch.tensor(out["pixel_values"])
        kw["image_grid_thw"] = torch.tensor(out["image_grid_thw"])
        counts["<|image_pad|>"] = [int(np.prod(g)) // 4 for g in out["image_grid_thw"]]
    if "video" in data:
        frames, meta = data["video"]
        per_frame = ip(images=list(frames), return_tensors="np")  # tp=2 copies per frame
        _, gh, gw = per_frame["image_grid_thw"][0]
        px = per_frame["pixel_values"].reshape(len(frames), gh * gw, 3, 2, 4, 4)[:, :, :, 0]
        t = len(frames) // 2
        px = px.reshape(t, 2, gh * gw, 3, 4, 4).transpose(0, 2, 3, 1, 4, 5).reshape(t * gh * gw, -1)
        kw["pixel_values_videos"] = torch.tensor(px)
        kw["video_grid_thw"] = torch.tensor([[t, gh, gw]])
        if arch == "qwen2_5_vl":
            kw["second_per_grid_ts"] = torch.tensor([2 / meta["fps"]])
        counts["<|video_pad|>"] = [t * gh * gw // 4]
    text = prompt["prompt"]
    for token, ns in counts.items():  # expand each placeholder to its feature tokens
        pieces = text.split(token)
        assert len(pieces) == len(ns) + 1
        text = pieces[0] + "".join(token * n + rest for n, rest in zip(ns, pieces[1:]))
    ids = torch.tensor([tok(text).input_ids])
    types = torch.zeros_like(ids)
    types[ids == tok.convert_tokens_to_ids("<|image_pad|>")] = 1
    types[ids == tok.convert_tokens_to_ids("<|video_pad|>")] = 2
    return dict(kw, input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types)


def _hf_generate(model, inputs: dict) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# ---------------------------------------------------------------------------------------
# Tests

ARCHS = ["llava", "qwen2_vl", "qwen2_5_vl"]


def _params():
    from jaxmm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, ckpt_root):
    """(arch, path, LLM, HF model); the budget of 64 tokens per step splits prompts in chunks."""
    from jaxmm import LLM

    arch = request.param
    path = make_vlm(ckpt_root, arch)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 2, "video": 1},
    )
    return arch, path, llm, _hf_model(path, arch)


def _encode_items(engine, mm) -> dict:
    """Run the encoder stage by hand for a prepared prompt's items: cache key -> rows."""
    if mm is None:
        return {}
    cache, rows_of = engine.encoder_cache, {}
    for it in mm.items:
        entry = cache.get(it.cache_key) or cache.allocate(it.cache_key, it.end - it.start, "t")
        rows_of[it.cache_key] = entry.rows
        engine.runner.encode([(it.modality, it.data, entry.rows)])
    return rows_of


def _chunk_rows(mm, rows_of: dict, start: int, n: int) -> list:
    out = []
    for it in mm.items:
        a, b = max(it.start, start), min(it.end, start + n)
        if a < b:
            out.append((a - start, rows_of[it.cache_key][a - it.start : b - it.start]))
    return out


def test_greedy_and_logits_match_transformers(vlm):
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt
    from jaxmm.runner.model_runner import SeqStep

    arch, path, llm, hf = vlm
    tok = llm.get_tokenizer()
    prompts = prompts_for(arch)
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    hf_inputs = [_hf_inputs(path, arch, p, tok) for p in prompts]
    for out, inputs in zip(outs, hf_inputs):
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
    assert len({len(o.prompt_token_ids) for o in outs}) == len(outs)  # different sizes
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model

    # last-token logits of each prompt, prefilled in chunks of 24 tokens so image spans
    # straddle steps (scratch pages at the top of the pool; the engine is idle)
    engine = llm.llm_engine
    runner = engine.runner
    rows = []
    for p in prompts:
        if "multi_modal_data" in p:
            _, ids, mm = prepare_multimodal_prompt(engine, p)
        else:
            ids, mm = llm.get_tokenizer()(p["prompt"]).input_ids, None
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
        rows.append(last)
    ours = np.stack(rows)
    with torch.no_grad():
        ref = np.stack([hf(**inputs).logits[0, -1].numpy() for inputs in hf_inputs])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_precomputed_embeddings_give_the_same_tokens(vlm):
    arch, path, llm, hf = vlm
    prompt = prompts_for(arch)[1]
    inputs = _hf_inputs(path, arch, prompt, llm.get_tokenizer())
    with torch.no_grad():
        if arch == "llava":
            feats = hf.model.get_image_features(
                inputs["pixel_values"],
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            ).pooler_output[0]
            item = feats[None]  # a torch tensor (N=1, n, D): read as N embeddings items
        else:
            feats = hf.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"]
            ).pooler_output[0]
            item = {"image_embeds": feats.numpy(), "image_grid_thw": inputs["image_grid_thw"][0]}
    pixels, embeds = llm.generate(
        [prompt, {"prompt": prompt["prompt"], "multi_modal_data": {"image": item}}],
        _params(),
        use_tqdm=False,
    )
    assert embeds.outputs[0].token_ids == pixels.outputs[0].token_ids
    assert embeds.prompt_token_ids == pixels.prompt_token_ids


def test_uuid_serves_a_none_item_from_the_encoder_cache(vlm):
    arch, _, llm, _ = vlm
    prompt = prompts_for(arch)[2]
    n = 2 if arch != "llava" else 1
    uuids = [f"{arch}-img-{i}" for i in range(n)]
    first = llm.generate(
        [{**prompt, "multi_modal_uuids": {"image": uuids}}], _params(), use_tqdm=False
    )[0]
    cache = llm.llm_engine._mm_frontend.cache
    hits = cache.hits
    again = llm.generate(
        [
            {
                "prompt": prompt["prompt"],
                "multi_modal_data": {"image": [None] * n},
                "multi_modal_uuids": {"image": uuids},
            }
        ],
        _params(),
        use_tqdm=False,
    )[0]
    assert cache.hits - hits == n
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens > 0  # the prefix cache keys pages by the uuid as well
    with pytest.raises(ValueError, match="not in the encoder cache"):
        llm.generate(
            [
                {
                    "prompt": prompt["prompt"],
                    "multi_modal_data": {"image": [None] * n},
                    "multi_modal_uuids": {"image": [f"{u}-unknown" for u in uuids]},
                }
            ],
            _params(),
            use_tqdm=False,
        )


def test_chat_with_image_parts_matches_generate(vlm):
    from tests.helpers import png_data_url

    arch, _, llm, _ = vlm
    url = png_data_url(IMAGES[2])
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_pil", "image_pil": IMAGES[3]},
            ],
        }
    ]
    chat = llm.chat(messages, _params(), use_tqdm=False)[0]
    placeholder = "<image>\n" if arch == "llava" else I_QWEN
    text = f"<|user|>{placeholder}What is in the picture?{placeholder}<|end|><|assistant|>"
    tok = llm.get_tokenizer()
    direct = llm.generate(
        [
            {
                "prompt_token_ids": tok(text, add_special_tokens=False).input_ids,
                "multi_modal_data": {"image": [IMAGES[2], IMAGES[3]]},
            }
        ],
        _params(),
        use_tqdm=False,
    )[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_mm_limits_and_embedding_shapes_are_checked(vlm):
    arch, _, llm, _ = vlm
    prompt = prompts_for(arch)[1]
    three = {"prompt": prompt["prompt"], "multi_modal_data": {"image": IMAGES[:3]}}
    with pytest.raises(ValueError, match="3 image item.*2 allowed"):
        llm.generate([three], _params(), use_tqdm=False)
    bad = np.zeros((5, 64), np.float32)
    item = bad if arch == "llava" else {"image_embeds": bad, "image_grid_thw": [1, 4, 4]}
    expected = r"\(16, 64\)" if arch == "llava" else r"\(4, 64\)"
    with pytest.raises(ValueError, match=rf"{expected}.*got \(5, 64\)"):
        llm.generate(
            [{"prompt": prompt["prompt"], "multi_modal_data": {"image": item}}],
            _params(),
            use_tqdm=False,
        )


def test_encoder_segment_attention_in_query_blocks_matches_dense():
    import jax.numpy as jnp

    from jaxmm.layers.attention import dense_attention
    from jaxmm.models.encoders.qwen2_vl_vision import segment_attention

    rs = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rs.randn(64, 2, 8), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat([0, 1, 1, 2, -1], [10, 20, 6, 20, 8]), jnp.int32)
    bias = jnp.where(seg[:, None] == seg[None, :], 0.0, -jnp.inf)[None, None]
    dense = dense_attention(q[None], k[None], v[None], causal=False, sm_scale=0.3, bias=bias)[0]
    blocked = segment_attention(q, k, v, seg, 0.3, block=16)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense), atol=1e-6, rtol=0)


def test_large_encoder_calls_without_command_buffers_give_the_same_features(vlm, monkeypatch):
    """Tower calls of many patches compile with other XLA options (`encoder_jit`); the
    features must not change. Here every call takes that path and is compared with the
    default one."""
    import jax

    from jaxmm.models import qwen2_vl

    arch, path, llm, hf = vlm
    if arch == "llava":
        pytest.skip("the Qwen2-VL towers only")
    fe = llm.llm_engine.mm_frontend()
    runner = llm.llm_engine.runner
    image = prompts_for(arch)[1]["multi_modal_data"]["image"]
    image = image[0] if isinstance(image, list) else image
    processed = fe.processor.image(image, {})

    def features():
        encode = runner.model_obj.mm_encoder(runner.graphdef)  # new programs each time
        return np.asarray(jax.device_get(encode(runner.params, "image", [processed])[0].array))

    default = features()
    monkeypatch.setattr(qwen2_vl, "LARGE_BUCKET_PATCHES", 0)
    large = features()
    np.testing.assert_array_equal(large, default)
