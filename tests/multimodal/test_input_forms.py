"""Input forms of vLLM's docs, each against its canonical form on a tiny random Qwen2-VL.

- `{"video": [frame0, frame1, ...]}`: a list of numpy or PIL frames is one video;
- a torch uint8 (T, H, W, 3) video tensor is a video (float tensors stay embeddings);
- Qwen2-VL embeddings of several images in one dict: `image_embeds` (total, D) with
  `image_grid_thw` (N, 3), split into N items by the grids;
- the server's `image_embeds` content parts with `image_grid_thw` sent base64-encoded as a
  `torch.save`d tensor (vLLM's client encoding), through a real server and the openai client.

Each must give the prompt tokens and greedy tokens of the canonical form (the (T, H, W, 3)
array, the images themselves).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from jaxmm import LLM, SamplingParams
from tests.helpers import persistent_compilation_cache
from tests.models.test_vlm_parity import I_QWEN, IMAGES, V_QWEN, VIDEO, make_vlm

NEW_TOKENS = 6
ENGINE_KW = dict(
    dtype="float32",
    max_model_len=256,
    max_num_batched_tokens=128,
    enable_mm_embeds=True,
    limit_mm_per_prompt={"image": 2, "video": 2},
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The server's engine compiles the offline engine's programs: it reads them back."""
    with persistent_compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
        yield


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    return make_vlm(ckpt_root, "qwen2_vl")


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, **ENGINE_KW)


def _params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


def _run(llm, prompts: list[dict]) -> list[tuple[list[int], list[int], list[float]]]:
    outs = llm.generate(prompts, _params(), use_tqdm=False)
    rows = []
    for o in outs:
        tokens = o.outputs[0].token_ids
        logprobs = [step[t].logprob for step, t in zip(o.outputs[0].logprobs, tokens)]
        rows.append((o.prompt_token_ids, tokens, logprobs))
    return rows


def _assert_same(got, want) -> None:
    """Same prompt and greedy tokens; logprobs equal to float32 rounding."""
    assert got[0] == want[0] and got[1] == want[1]
    np.testing.assert_allclose(got[2], want[2], atol=1e-5, rtol=0)


def _video_prompt(video, n: int = 1) -> dict:
    return {"prompt": f"Video: {V_QWEN * n} what happens", "multi_modal_data": {"video": video}}


def test_a_list_of_frames_is_one_video(llm):
    frames = list(VIDEO)  # (H, W, 3) uint8 each
    other = VIDEO[::-1].copy()
    want, *got = _run(
        llm,
        [
            _video_prompt(VIDEO),
            _video_prompt(frames),
            _video_prompt([Image.fromarray(f) for f in frames]),
            _video_prompt((frames, {"fps": 2.0})),  # frames with their metadata
        ],
    )
    for row in got:
        _assert_same(row, want)
    # a list of (T, H, W, 3) arrays, or of frame lists, is still one video each
    two = _run(
        llm,
        [
            _video_prompt([VIDEO, other], 2),
            _video_prompt([frames, list(other)], 2),
        ],
    )
    _assert_same(two[1], two[0])
    pad = llm.get_tokenizer().convert_tokens_to_ids("<|video_pad|>")
    assert two[0][0].count(pad) == 2 * want[0].count(pad) > 0


def test_a_uint8_video_tensor_is_a_video(llm):
    want, got = _run(llm, [_video_prompt(VIDEO), _video_prompt(torch.from_numpy(VIDEO))])
    _assert_same(got, want)
    # a float tensor is an embedding: Qwen2-VL's need their grid, which a bare tensor lacks
    with pytest.raises(ValueError, match="need their grid"):
        llm.generate([_video_prompt(torch.zeros(4, 64))], _params(), use_tqdm=False)


def _hf_image_embeds(ckpt: str, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Qwen2-VL image features of `images`, concatenated: (total, D), and
    their grids (N, 3)."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    x = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=images, return_tensors="pt")
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        feats = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
    return torch.cat(list(feats.pooler_output)), x["image_grid_thw"]


@pytest.fixture(scope="module")
def two_image_embeds(ckpt):
    return _hf_image_embeds(ckpt, IMAGES[1:3])


def test_multi_image_embeddings_in_one_dict(llm, two_image_embeds):
    embeds, grids = two_image_embeds
    assert grids.shape == (2, 3) and not torch.equal(grids[0], grids[1])
    prompt = f"Hello {I_QWEN} and {I_QWEN} what"
    rows = (grids.prod(-1) // 4).tolist()
    first, second = embeds.split(rows)
    forms = [
        IMAGES[1:3],
        {"image_embeds": embeds, "image_grid_thw": grids},
        {"image_embeds": embeds.numpy(), "image_grid_thw": grids.tolist()},
        [
            {"image_embeds": first, "image_grid_thw": grids[0]},
            {"image_embeds": second, "image_grid_thw": grids[1]},
        ],
    ]
    want, *got = _run(llm, [{"prompt": prompt, "multi_modal_data": {"image": f}} for f in forms])
    for row in got:
        _assert_same(row, want)
    # uuids name the split items one by one
    uuids = {"image": ["a", "b"]}
    data = {"image": forms[1]}
    (row,) = _run(llm, [{"prompt": prompt, "multi_modal_data": data, "multi_modal_uuids": uuids}])
    _assert_same(row, want)
    with pytest.raises(ValueError, match="cannot be split"):
        bad = {"image_embeds": embeds[:-1], "image_grid_thw": grids}
        llm.generate([{"prompt": prompt, "multi_modal_data": {"image": bad}}], _params())


# ---------------------------------------------------------------------------------------
# The server


def _b64_tensor(x: torch.Tensor) -> str:
    """vLLM's client encoding of a tensor: torch.save, then base64."""
    buf = io.BytesIO()
    torch.save(x, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_image_embeds_with_a_base64_grid(ckpt, two_image_embeds):
    from openai import OpenAI

    from tests.server.live_util import KEY, NAME, live_server

    embeds, grids = two_image_embeds
    rows = (grids.prod(-1) // 4).tolist()
    first, second = embeds.split(rows)

    def ask(client, parts: list[dict]) -> tuple[str, list[str]]:
        out = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}],
            max_tokens=NEW_TOKENS,
            temperature=0,
            logprobs=True,
            extra_body={"ignore_eos": True},
        )
        choice = out.choices[0]
        return choice.message.content, [t.token for t in choice.logprobs.content]

    def embeds_part(x: torch.Tensor, grid: torch.Tensor) -> dict:
        return {
            "type": "image_embeds",
            "image_embeds": {"image_embeds": _b64_tensor(x), "image_grid_thw": _b64_tensor(grid)},
        }

    with live_server(ckpt, **ENGINE_KW) as (_, url):
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
        image = {"type": "image_url", "image_url": {"url": _data_url(IMAGES[1])}}
        want = ask(client, [image])
        assert len(want[1]) == NEW_TOKENS
        assert ask(client, [embeds_part(first, grids[0])]) == want  # grid (3,)
        assert ask(client, [embeds_part(first, grids[:1])]) == want  # grid (1, 3)
        # both images' rows in one part, with their (2, 3) grids: two images
        images = [image, {"type": "image_url", "image_url": {"url": _data_url(IMAGES[2])}}]
        assert ask(client, [embeds_part(embeds, grids)]) == ask(client, images)
