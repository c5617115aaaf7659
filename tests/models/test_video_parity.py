"""Video parity with transformers' own video path: Qwen2-VL and Qwen2.5-VL, float32.

The reference is what a transformers user gets from `AutoProcessor` (its video processor,
which needs torchvision) and the model's `generate`: same prompt ids, same greedy tokens, and
the top-20 log-probabilities of every generated step within 1e-4 (logits up to the softmax's
shift). The videos have odd frame counts and non-square frames that are resized; they come
raw (no frame rate: HF assumes 24 fps), with an fps, with vLLM-style metadata of frames
already sampled from a longer clip, sampled by jaxmm (`media_io_kwargs` num_frames), and with
an explicit rate (`media_io_kwargs` fps). Qwen2.5-VL's checkpoint carries a video processor
config with its own pixel budget and no mean/std (the video processor's defaults apply).

Where torchvision is missing, the same cases run against a reference built here from torch
(the resize HF's video processor calls, its fused normalisation and patch order) with the
frame rate from transformers' `VideoMetadata`, and HF's model.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import make_tokenizer

NEW_TOKENS = 8
V_QWEN = "<|vision_start|><|video_pad|><|vision_end|>"
ARCHS = ["qwen2_vl", "qwen2_5_vl"]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _video(T: int, h: int, w: int, seed: int) -> np.ndarray:
    """Blocky frames (not pure noise) that change from frame to frame."""
    rs = np.random.RandomState(seed)
    small = rs.randint(0, 256, (T, h // 3 + 1, w // 3 + 1, 3)).astype(np.uint8)
    return np.ascontiguousarray(small.repeat(3, axis=1).repeat(3, axis=2)[:, :h, :w])


V5 = _video(5, 27, 44, 0)  # resized (to 24x48, or 16x32 under Qwen2.5-VL's video budget)
V3 = _video(3, 40, 24, 1)  # no resize for Qwen2-VL; odd count padded with the last frame
V7 = _video(7, 30, 46, 2)
CLIP_INDICES = [0, 4, 8, 12, 16]  # V5 as 5 frames taken from a 20-frame clip
KEPT = [0, 3, 6]  # what num_frames=3 keeps of 7 (uniform, ends included)


def cases() -> list[dict]:
    """jaxmm's prompt pieces and what a transformers user passes for the same video."""
    return [
        dict(name="raw", video=V5, hf_videos=V5, hf_meta=None),
        dict(
            name="fps",
            video=(V3, {"fps": 3.0}),
            hf_videos=V3,
            hf_meta={"fps": 3.0, "total_num_frames": 3},
        ),
        dict(
            name="sampled clip",
            video=(V5, {"fps": 8.0, "total_num_frames": 20, "frames_indices": CLIP_INDICES}),
            hf_videos=V5,
            hf_meta={"fps": 8.0, "total_num_frames": 20, "frames_indices": CLIP_INDICES},
        ),
        dict(
            name="num_frames",
            video=(V7, {"fps": 6.0}),
            io={"video": {"num_frames": 3}},
            hf_videos=V7[KEPT],
            hf_meta={"fps": 6.0, "total_num_frames": 7, "frames_indices": KEPT},
        ),
        dict(
            name="io fps",
            video=V3,
            io={"video": {"fps": 0.5}},
            hf_videos=V3,
            hf_meta={"fps": 0.5, "total_num_frames": 3},
        ),
    ]


def _prompt(case: dict) -> dict:
    p = {"prompt": f"Video: {V_QWEN} what happens", "multi_modal_data": {"video": case["video"]}}
    if case.get("io"):
        p["media_io_kwargs"] = case["io"]
    return p


# ---------------------------------------------------------------------------------------
# Tiny checkpoints


def make_video_checkpoint(root: str, arch: str, seed: int = 3) -> str:
    """A random tiny Qwen2-VL / Qwen2.5-VL with its image processor config; Qwen2.5-VL also
    gets a `video_preprocessor_config.json` with a smaller pixel budget of its own."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = os.path.join(root, f"video-{arch}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.save_pretrained(path)
    ids = {
        f"{name}_token_id": tok.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("vision_start", "vision_end")
    }
    ids["image_token_id"] = tok.convert_tokens_to_ids("<|image_pad|>")
    ids["video_token_id"] = tok.convert_tokens_to_ids("<|video_pad|>")
    text = dict(
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
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )
    common = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=4)
    if arch == "qwen2_vl":
        vision = dict(common, depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    else:
        vision = dict(
            common,
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            window_size=16,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        )
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():  # larger-than-default weights: greedy paths without near-ties
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)
    model.eval().save_pretrained(path)
    Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=48 * 48
    ).save_pretrained(path)
    if arch == "qwen2_5_vl":
        video = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": 8 * 8, "longest_edge": 24 * 32},
            "patch_size": 4,
            "merge_size": 2,
            "temporal_patch_size": 2,
        }
        with open(os.path.join(path, "video_preprocessor_config.json"), "w") as f:
            json.dump(video, f)
    return path


# ---------------------------------------------------------------------------------------
# The transformers side


def _hf_inputs_video_processor(path: str, case: dict) -> dict:
    """Through transformers' `AutoProcessor` and its video processor, as a user calls it."""
    import transformers

    proc = transformers.AutoProcessor.from_pretrained(path)
    kw = {} if case["hf_meta"] is None else {"video_metadata": [case["hf_meta"]]}
    out = proc(
        text=[_prompt(case)["prompt"]], videos=[case["hf_videos"]], return_tensors="pt", **kw
    )
    return dict(out)


def _hf_inputs_torch(path: str, case: dict) -> dict:
    """Without torchvision: the video processor's arithmetic in torch (the interpolate call
    `tvF.resize` makes for uint8 frames, mean and std scaled by 255 in float32, frames padded
    with the last one, HF's patch order), the frame rate from transformers' `VideoMetadata`,
    and the placeholder expanded here."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    from transformers.video_utils import VideoMetadata

    tok = transformers.AutoTokenizer.from_pretrained(path)
    name = "video_preprocessor_config.json"
    if not os.path.exists(os.path.join(path, name)):
        name = "preprocessor_config.json"
    with open(os.path.join(path, name)) as f:
        vc = json.load(f)
    p, m, tp = vc["patch_size"], vc["merge_size"], vc["temporal_patch_size"]
    mean = torch.tensor(vc.get("image_mean", [0.48145466, 0.4578275, 0.40821073])) * 255.0
    std = torch.tensor(vc.get("image_std", [0.26862954, 0.26130258, 0.27577711])) * 255.0
    frames = torch.from_numpy(case["hf_videos"]).permute(0, 3, 1, 2).contiguous()
    T, C, H, W = frames.shape
    size = vc["size"]
    h, w = smart_resize(H, W, p * m, size["shortest_edge"], size["longest_edge"])
    if (h, w) != (H, W):
        frames = torch.nn.functional.interpolate(
            frames, size=(h, w), mode="bicubic", antialias=True, align_corners=False
        )
    x = (frames.to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    if T % tp:
        x = torch.cat([x, x[-1:].expand(tp - T % tp, -1, -1, -1)])
    t, gh, gw = len(x) // tp, h // p, w // p
    x = x.view(t, tp, C, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = x.reshape(t * gh * gw, C * tp * p * p)
    meta = VideoMetadata(**{"total_num_frames": T, **(case["hf_meta"] or {})})
    n = t * gh * gw // (m * m)
    ids = torch.tensor(
        [tok(_prompt(case)["prompt"].replace("<|video_pad|>", "<|video_pad|>" * n)).input_ids]
    )
    types = (ids == tok.convert_tokens_to_ids("<|video_pad|>")).long() * 2
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values_videos=pixels,
        video_grid_thw=torch.tensor([[t, gh, gw]]),
    )
    if "2_5" in path:
        inputs["second_per_grid_ts"] = torch.tensor([tp / meta.sampled_fps])
    return inputs


def _hf_generate(model, inputs: dict) -> tuple[list[int], list[np.ndarray]]:
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [torch.log_softmax(lg[0].double(), -1).numpy() for lg in out.logits]
    return tokens, logprobs


# ---------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module", params=ARCHS)
def video_model(request, ckpt_root):
    import transformers

    from jaxmm import LLM

    arch = request.param
    path = make_video_checkpoint(ckpt_root, arch)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        limit_mm_per_prompt={"video": 1},
    )
    cls = {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }[arch]
    return arch, path, llm, cls.from_pretrained(path, dtype=torch.float32).eval()


def _check_against(video_model, hf_inputs) -> None:
    from jaxmm import SamplingParams
    from jaxmm.multimodal.processor import MultimodalProcessor

    arch, path, llm, hf = video_model
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20)
    all_cases = cases()
    outs = llm.generate([_prompt(c) for c in all_cases], params, use_tqdm=False)
    distinct = set()
    processor = MultimodalProcessor.from_pretrained(path)
    for case, out in zip(all_cases, outs):
        inputs = hf_inputs(path, case)
        pixels = processor.video(case["hf_videos"])["pixel_values"]
        np.testing.assert_array_equal(pixels, inputs["pixel_values_videos"].numpy(), case["name"])
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist(), case["name"]
        tokens, ref = _hf_generate(hf, inputs)
        assert out.outputs[0].token_ids == tokens, case["name"]
        for step, (lp, row) in enumerate(zip(out.outputs[0].logprobs, ref)):
            ids = sorted(lp)
            ours = np.array([lp[i].logprob for i in ids])
            np.testing.assert_allclose(
                ours, row[ids], atol=1e-4, rtol=0, err_msg=f"{case['name']} step {step}"
            )
        distinct.add(tuple(tokens))
    assert len(distinct) > 2  # the cases lead to different continuations


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' video processor needs torchvision")
def test_video_matches_transformers_video_processor(video_model):
    _check_against(video_model, _hf_inputs_video_processor)


def test_video_matches_torch_reference_and_hf_frame_rates(video_model):
    _check_against(video_model, _hf_inputs_torch)


def test_resize_is_torch_uint8_antialiased_resize_bit_for_bit():
    from jaxmm.multimodal.video_pixels import resize_uint8

    rs = np.random.RandomState(0)
    sizes = [(30, 46, 32, 48), (30, 46, 16, 32), (37, 23, 40, 24), (300, 500, 112, 168)]
    sizes += [tuple(int(v) for v in rs.randint(4, 120, 4)) for _ in range(12)]
    for H, W, h, w in sizes:
        frames = rs.randint(0, 256, (2, H, W, 3)).astype(np.uint8)
        frames[1] = (np.arange(H)[:, None, None] * 7 + np.arange(W)[None, :, None] * 3) % 256
        for kind in ("bicubic", "bilinear"):
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(),
                size=(h, w),
                mode=kind,
                antialias=True,
                align_corners=False,
            )
            ours = resize_uint8(frames, h, w, kind)
            np.testing.assert_array_equal(
                ours, ref.permute(0, 2, 3, 1).numpy(), f"{kind} {H}x{W}->{h}x{w}"
            )
