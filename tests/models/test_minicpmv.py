"""MiniCPM-V 4.6 parity with transformers on a tiny random checkpoint, float32.

The checkpoint (tower with its window merger after layer 1, merger, Qwen3.5 text model with
linear and full attention layers) is saved with `save_pretrained` next to its
`MiniCPMV4_6Processor` (PIL image processor with a small `scale_resolution`, so that images
of a few dozen pixels are sliced; a tokenizer with MiniCPM-V's named tokens). Prompts: one
small image (no slices, upscaled), a wide one cut into 1x2 slices, two images (a tall one
cut into slices and a small one) in one prompt.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_processor, make_tokenizer

NEW_TOKENS = 8
PATCH = 7
SCALE = 56  # scale_resolution: 8x8 patches; images larger than 56^2 are sliced
SPECIALS = dict(
    image_token="<|image_pad|>",
    video_token="<|video_pad|>",
    image_start_token="<image>",
    image_end_token="</image>",
    slice_start_token="<slice>",
    slice_end_token="</slice>",
    image_id_start_token="<image_id>",
    image_id_end_token="</image_id>",
)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 255, (h // 4 + 1, w // 4 + 1, 3), np.uint8)  # blocky, not noise
    return Image.fromarray(base).resize((w, h), Image.NEAREST)


SMALL = _image(30, 40, 0)  # no slices: upscaled to the source view only
WIDE = _image(50, 120, 1)  # source view 4x12 patches + 1x2 slices of 8x8
TALL = _image(130, 60, 2)  # 2x1 slices: rows joined by "\n"

PROMPTS = [
    {"prompt": "<|image_pad|>\nDescribe the image.", "multi_modal_data": {"image": SMALL}},
    {"prompt": "Hello <|image_pad|> what is this", "multi_modal_data": {"image": WIDE}},
    {
        "prompt": "The quick <|image_pad|> brown fox <|image_pad|> jumps",
        "multi_modal_data": {"image": [TALL, SMALL]},
    },
]


def _processor(tok):
    import transformers
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (
        MiniCPMV4_6ImageProcessorPil,
    )
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import (
        MiniCPMV4_6VideoProcessor,
    )

    return make_processor(
        transformers.MiniCPMV4_6Processor,
        image_processor=MiniCPMV4_6ImageProcessorPil(
            scale_resolution=SCALE, patch_size=PATCH, max_slice_nums=4
        ),
        video_processor=MiniCPMV4_6VideoProcessor(scale_resolution=SCALE, patch_size=PATCH),
        tokenizer=tok,
    )


def _randomize(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():  # larger than default, so greedy paths are not decided by ties
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.0)
            elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)


def make_minicpmv(root: str, seed: int = 0) -> str:
    import transformers

    path = os.path.join(root, "minicpmv4_6")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS.values())})
    tok.save_pretrained(path)
    # reloaded with the names, so the processor finds tok.image_token etc. (and they are saved)
    tok = transformers.AutoTokenizer.from_pretrained(path, extra_special_tokens=SPECIALS)
    tok.save_pretrained(path)
    text = transformers.Qwen3_5TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=SCALE,
        patch_size=PATCH,
    )
    cfg = transformers.MiniCPMV4_6Config(
        text_config=text.to_dict(),
        vision_config=vision,
        insert_layer_id=1,
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
    )
    model = transformers.MiniCPMV4_6ForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    _processor(tok).save_pretrained(path)
    return path


def _hf_inputs(path: str, prompt: dict) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    images = prompt["multi_modal_data"]["image"]
    images = images if isinstance(images, list) else [images]
    out = _processor(tok)(text=[prompt["prompt"]], images=[images], return_tensors="pt")
    return {k: v for k, v in out.items()}


def _hf_generate(model, inputs: dict) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def minicpmv(ckpt_root):
    import transformers

    from jaxmm import LLM

    path = make_minicpmv(ckpt_root)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=32,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 2},
    )
    hf = transformers.MiniCPMV4_6ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32
    ).eval()
    return path, llm, hf


def test_greedy_and_logits_match_transformers(minicpmv):
    """Greedy tokens and last-token logits (prefilled in 24-token chunks that cut through
    the image spans), for a plain, a sliced and a two-image prompt."""
    from jaxmm import SamplingParams
    from tests.models.test_qwen3_5 import _chunked_last_logits

    path, llm, hf = minicpmv
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    inputs = [_hf_inputs(path, p) for p in PROMPTS]
    assert [len(i["target_sizes"]) for i in inputs] == [1, 3, 1 + 2 + 1]  # 1x2 and 2x1 slices
    for out, inp in zip(outs, inputs):
        assert out.prompt_token_ids == inp["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == _hf_generate(hf, inp)
    assert any(len(set(o.outputs[0].token_ids)) > 2 for o in outs)  # not a degenerate model
    ours = np.stack([_chunked_last_logits(llm, p) for p in PROMPTS])
    with torch.no_grad():
        ref = np.stack([hf(**inp).logits[0, -1].numpy() for inp in inputs])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_precomputed_embeddings_with_image_sizes_give_the_same_tokens(minicpmv):
    """vLLM's MiniCPM-V embeddings form: HF's merger rows (source view, then slices) with the
    image's (width, height); the slice layout comes from the size. Wrong row counts and a
    missing size are refused with the reason."""
    from jaxmm import SamplingParams

    path, llm, hf = minicpmv
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    inputs = _hf_inputs(path, PROMPTS[1])
    with torch.no_grad():
        feats = hf.model.get_image_features(inputs["pixel_values"], inputs["target_sizes"])
    rows = torch.cat(feats.pooler_output).numpy()
    assert len(rows) == 3 + 4 + 4  # source view 4x12 patches, two 8x8 slices
    prompt = {"prompt": PROMPTS[1]["prompt"]}
    out = llm.generate(
        {**prompt, "multi_modal_data": {"image": {"image_embeds": rows, "image_sizes": WIDE.size}}},
        params,
        use_tqdm=False,
    )[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert out.outputs[0].token_ids == _hf_generate(hf, inputs)
    with pytest.raises(ValueError, match="takes 11 embedding rows"):
        llm.generate(
            {
                **prompt,
                "multi_modal_data": {
                    "image": {"image_embeds": rows[:-1], "image_sizes": WIDE.size}
                },
            },
            params,
            use_tqdm=False,
        )
    with pytest.raises(ValueError, match="image_sizes"):
        llm.generate({**prompt, "multi_modal_data": {"image": rows}}, params, use_tqdm=False)


def test_tower_rows_match_transformers_in_both_downsample_modes(minicpmv):
    """Each sub-image's merger rows against transformers' `get_image_features`: "16x" (window
    merger inside the tower) and "4x" (no window merger, 4x the rows), sub-images of two
    sizes in one call padded to one patch count (their padding masked)."""
    import copy

    from flax import nnx

    path, llm, hf = minicpmv
    runner = llm.llm_engine.runner
    inputs = _hf_inputs(path, PROMPTS[2])
    px, sizes = inputs["pixel_values"], inputs["target_sizes"]
    assert {(h, w) for h, w in sizes.tolist()} == {(12, 4), (8, 8)}  # 48 patches padded to 64
    C, p = px.shape[1], px.shape[2]
    flat = px[0].numpy().reshape(C, p, -1, p).transpose(2, 0, 1, 3).reshape(-1, C * p * p)
    for mode in ("16x", "4x"):
        model = copy.copy(nnx.merge(runner.graphdef, runner.params))
        model.use_vit_merger = mode == "16x"
        model.divisor = 16 if mode == "16x" else 4
        with torch.no_grad():
            ref = hf.model.get_image_features(px, sizes, downsample_mode=mode).pooler_output
        n = [h * w for h, w in sizes.tolist()]
        patches = np.zeros((len(n), max(n), flat.shape[1]), np.float32)
        pos = np.zeros((len(n), max(n)), np.int32)
        for k, (start, (h, w)) in enumerate(zip(np.cumsum(n) - n, sizes.tolist())):
            patches[k, : n[k]], pos[k, : n[k]] = model.sub_image_inputs(
                flat[start : start + n[k]], h, w
            )
        rows = np.asarray(model.sub_image_features(patches, pos, np.array(n, np.int32)))
        for k, want in enumerate(ref):
            assert n[k] // model.divisor == len(want)
            np.testing.assert_allclose(rows[k, : len(want)], want.numpy(), atol=1e-5, rtol=0)


def test_chat_and_token_id_prompts_get_the_image_ids(minicpmv):
    """The processor's `<image_id>i</image_id>` before each image also for prompts given as
    token ids, and so through `LLM.chat` (which hands the engine its rendered ids): the HF
    processor's ids on the rendered text, and its tokens."""
    from jaxmm import SamplingParams

    path, llm, hf = minicpmv
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_pil", "image_pil": WIDE},
                {"type": "text", "text": "What is this?"},
                {"type": "image_pil", "image_pil": SMALL},
            ],
        }
    ]
    chat = llm.chat(messages, params, use_tqdm=False)[0]
    text = "<|user|><|image_pad|>\nWhat is this?\n<|image_pad|><|end|><|assistant|>"
    tok = llm.get_tokenizer()
    inputs = _processor(tok)(
        text=[text], images=[[WIDE, SMALL]], add_special_tokens=False, return_tensors="pt"
    )
    inputs = dict(inputs)
    want = inputs["input_ids"][0].tolist()
    assert chat.prompt_token_ids == want
    assert want.count(tok.convert_tokens_to_ids("<image_id>")) == 2
    assert chat.outputs[0].token_ids == _hf_generate(hf, inputs)
    ids = tok(text, add_special_tokens=False).input_ids
    data = {"image": [WIDE, SMALL]}
    direct = llm.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": data}], params, use_tqdm=False
    )[0]
    assert direct.prompt_token_ids == want
    # a prompt with the ids written already keeps them once
    marked = text.replace("<|image_pad|>\n", "<image_id>0</image_id><|image_pad|>\n", 1)
    marked = marked.replace("\n<|image_pad|>", "\n<image_id>1</image_id><|image_pad|>")
    out = llm.generate([{"prompt": marked, "multi_modal_data": data}], params, use_tqdm=False)
    assert out[0].prompt_token_ids == [tok.bos_token_id] + want
