"""The multimodal front end against a fake model: parsing, limits, embeddings, hashing, caches.

No JAX here: the fake model implements the small contract the front end reads
(`mm_token_id`, `mm_num_tokens`, `mm_check_embeds`, ...) with a Qwen-style token count
(t*h*w/4), and records each item it is asked to size (one per processed item), so a test
can tell by hand which items were processed and which came from the front end's cache. The
front end encodes nothing (the engine's encoder stage does). The tokenizer and the HF image
processor are real (tiny, built in a temp dir).
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from jaxmm.config import MultimodalConfig
from jaxmm.multimodal.cache import EncoderCache, EncoderOutput
from jaxmm.multimodal.chat_parts import conversation_to_mm_prompt
from jaxmm.multimodal.inputs import (
    MultimodalRequest,
    PlacedItem,
    prepare_multimodal_prompt,
)
from jaxmm.runner.model_runner import SeqStep
from tests.helpers import make_tokenizer

D = 8
I_PH = "<|vision_start|><|image_pad|><|vision_end|>"
V_PH = "<|vision_start|><|video_pad|><|vision_end|>"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class FakeModel:
    """The front end's model contract, by hand: 4 patches per token, rows = pixel means."""

    is_multimodal = True
    mm_modalities = ("image", "video")
    uses_mrope = False

    def __init__(self, tok):
        self.ids = {
            "image": tok.convert_tokens_to_ids("<|image_pad|>"),
            "video": tok.convert_tokens_to_ids("<|video_pad|>"),
            "start": tok.convert_tokens_to_ids("<|vision_start|>"),
            "end": tok.convert_tokens_to_ids("<|vision_end|>"),
        }
        self.calls: list[str] = []  # the modality of each processed item, in order

    def mm_token_id(self, modality):
        return self.ids[modality]

    def mm_prompt_placeholder(self, modality):
        return [self.ids["start"], self.ids[modality], self.ids["end"]]

    def mm_num_tokens(self, modality, item):
        self.calls.append(modality)
        return self.tokens(item)

    @staticmethod
    def tokens(item):
        t, h, w = item["grid_thw"]
        return t * h * w // 4

    def mm_check_embeds(self, modality, embeds, meta):
        if "grid_thw" not in meta:
            raise ValueError("needs grid_thw")
        want = (self.tokens(meta), D)
        if tuple(embeds.shape) != want:
            raise ValueError(f"expected {want}, got {tuple(embeds.shape)}")
        return meta


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = str(tmp_path_factory.mktemp("mm_frontend"))
    tok = make_tokenizer(path)
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=48 * 48
    ).save_pretrained(path)
    return path


@dataclass
class FakeEngine:
    tokenizer: object
    runner: object
    config: object
    checkpoint: object
    _fe: object = None

    def mm_frontend(self):
        from jaxmm.multimodal.inputs import MultimodalFrontend

        if self._fe is None:
            self._fe = MultimodalFrontend(
                self.runner.model_obj,
                self.tokenizer,
                self.checkpoint.processor_path,
                self.config.multimodal,
            )
        return self._fe

    def audio_frontend(self):
        from jaxmm.multimodal.audio_inputs import AudioFrontend

        return AudioFrontend(
            self.runner.model_obj,
            self.tokenizer,
            self.checkpoint.processor_path,
            self.config.multimodal,
            None,
        )


def make_engine(model_dir, **mm) -> FakeEngine:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    runner = SimpleNamespace(model_obj=FakeModel(tok), graphdef=None, params=None)
    config = SimpleNamespace(multimodal=MultimodalConfig(**mm))
    return FakeEngine(tok, runner, config, SimpleNamespace(processor_path=model_dir))


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------


def test_placeholders_expand_and_steps_get_their_rows(model_dir):
    engine = make_engine(model_dir)
    a, b = image(40, 50, 0), image(16, 24, 1)  # grids (10, 12) and (4, 6): 30 and 6 tokens
    text, ids, mm = prepare_multimodal_prompt(
        engine, {"prompt": f"Hi {I_PH} and {I_PH} end", "multi_modal_data": {"image": [a, b]}}
    )
    model = engine.runner.model_obj
    assert text.startswith("Hi")
    assert ids.count(model.ids["image"]) == 36
    assert [(it.end - it.start) for it in mm.items] == [30, 6]
    assert all(ids[it.start - 1] == model.ids["start"] for it in mm.items)
    assert all(ids[it.end] == model.ids["end"] for it in mm.items)
    assert model.calls == ["image", "image"]  # each processed once
    assert [k[:2] for k in mm.extra_keys] == [(it.start, it.end) for it in mm.items]

    # the items' spans cover every placeholder token exactly once, and carry host inputs
    filled = np.zeros(len(ids), int)
    for it in mm.items:
        filled[it.start : it.end] += 1
        assert isinstance(it.data["pixel_values"], np.ndarray)
        assert model.tokens(it.data) == it.end - it.start
    placeholder = np.array(ids) == model.ids["image"]
    assert (filled == placeholder).all()


def test_same_content_same_key_from_any_source(model_dir):
    engine = make_engine(model_dir)
    img = image(24, 32, 3)
    sources = [
        img,
        np.asarray(img),
        png_bytes(img),
        "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode(),
    ]
    keys = []
    for src in sources:
        _, _, mm = prepare_multimodal_prompt(
            engine, {"prompt": f"x {I_PH}", "multi_modal_data": {"image": src}}
        )
        keys.append(mm.items[0].key)
    assert len(set(keys)) == 1
    assert engine.runner.model_obj.calls == ["image"]  # then cache hits
    _, _, other = prepare_multimodal_prompt(
        engine, {"prompt": f"x {I_PH}", "multi_modal_data": {"image": image(24, 32, 4)}}
    )
    assert other.items[0].key != keys[0]
    # processor options are part of the key: a different pixel budget is a different item
    _, _, small = prepare_multimodal_prompt(
        engine,
        {
            "prompt": f"x {I_PH}",
            "multi_modal_data": {"image": img},
            "mm_processor_kwargs": {"max_pixels": 16 * 16},
        },
    )
    assert small.items[0].key != keys[0] and small.items[0].end - small.items[0].start < 24


def test_duplicate_images_in_a_prompt_are_encoded_once(model_dir):
    engine = make_engine(model_dir)
    img = image(16, 16, 5)
    _, _, mm = prepare_multimodal_prompt(
        engine, {"prompt": f"{I_PH}{I_PH}", "multi_modal_data": {"image": [img, img]}}
    )
    assert engine.runner.model_obj.calls == ["image"]
    assert mm.items[0].data is mm.items[1].data


def test_processor_runs_beside_the_hash_and_a_hit_ignores_it(model_dir):
    """The front end runs the image processor while the item's key is hashed. On an encoder
    cache hit its result, or its error, is thrown away; on a miss its error is the item's."""
    engine = make_engine(model_dir)
    img = image(24, 32, 11)
    prompt = {"prompt": f"x {I_PH}", "multi_modal_data": {"image": img}}
    _, _, first = prepare_multimodal_prompt(engine, prompt)
    fe = engine.mm_frontend()

    def broken(*args, **kwargs):
        raise ValueError("processor failed")

    real = fe.processor.image
    fe.processor.image = broken
    try:
        _, _, again = prepare_multimodal_prompt(engine, prompt)  # a hit: no error
        assert again.items[0].key == first.items[0].key
        assert again.items[0].data is first.items[0].data
        fresh = {"prompt": f"x {I_PH}", "multi_modal_data": {"image": image(24, 32, 12)}}
        with pytest.raises(ValueError, match="processor failed"):  # a miss: its error
            prepare_multimodal_prompt(engine, fresh)
    finally:
        fe.processor.image = real
    assert engine.runner.model_obj.calls == ["image"]


def test_uuid_items_are_served_from_the_cache(model_dir):
    engine = make_engine(model_dir)
    model = engine.runner.model_obj
    img = image(16, 24, 6)
    prompt = {"prompt": f"look {I_PH}", "multi_modal_uuids": {"image": "cat"}}
    _, ids1, mm1 = prepare_multimodal_prompt(engine, {**prompt, "multi_modal_data": {"image": img}})
    _, ids2, mm2 = prepare_multimodal_prompt(
        engine, {**prompt, "multi_modal_data": {"image": None}}
    )
    assert ids1 == ids2 and mm1.extra_keys == mm2.extra_keys
    assert mm1.items[0].key == "cat"
    assert mm1.items[0].data is mm2.items[0].data
    assert model.calls == ["image"]
    # a known uuid with media skips the processor and the encoder too
    prepare_multimodal_prompt(engine, {**prompt, "multi_modal_data": {"image": image(8, 8, 7)}})
    assert model.calls == ["image"]

    with pytest.raises(ValueError, match="'dog' is not in the encoder cache"):
        prepare_multimodal_prompt(
            engine,
            {
                "prompt": f"{I_PH}",
                "multi_modal_data": {"image": None},
                "multi_modal_uuids": {"image": "dog"},
            },
        )
    with pytest.raises(ValueError, match="None item must come with a uuid"):
        prepare_multimodal_prompt(
            engine, {"prompt": f"{I_PH}", "multi_modal_data": {"image": None}}
        )
    with pytest.raises(ValueError, match="2 entries for 1 image"):
        prepare_multimodal_prompt(
            engine,
            {
                "prompt": I_PH,
                "multi_modal_data": {"image": img},
                "multi_modal_uuids": {"image": ["a", "b"]},
            },
        )
    with pytest.raises(ValueError, match="no multi_modal_data"):
        prepare_multimodal_prompt(
            engine,
            {
                "prompt": I_PH,
                "multi_modal_data": {"image": img},
                "multi_modal_uuids": {"video": "v"},
            },
        )


def test_limits_per_prompt(model_dir):
    engine = make_engine(model_dir, limit_mm_per_prompt={"image": 1, "video": {"count": 0}})
    imgs = [image(16, 16, 1), image(16, 16, 2)]
    with pytest.raises(ValueError, match=r"2 image item\(s\), more than the 1 allowed"):
        prepare_multimodal_prompt(engine, {"prompt": I_PH * 2, "multi_modal_data": {"image": imgs}})
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"1 video item\(s\), more than the 0 allowed"):
        prepare_multimodal_prompt(engine, {"prompt": V_PH, "multi_modal_data": {"video": frames}})
    with pytest.raises(ValueError, match="does not take 'audio'"):
        prepare_multimodal_prompt(
            engine, {"prompt": "x", "multi_modal_data": {"audio": (np.zeros(10), 16000)}}
        )
    prepare_multimodal_prompt(engine, {"prompt": I_PH, "multi_modal_data": {"image": imgs[0]}})


def test_embeddings_need_the_flag_and_the_right_shape(model_dir):
    grid = (1, 4, 6)  # 6 tokens
    good = np.random.RandomState(0).randn(6, D).astype(np.float32)
    item = {"image_embeds": good, "image_grid_thw": grid}
    off = make_engine(model_dir)
    with pytest.raises(ValueError, match="enable_mm_embeds=True"):
        prepare_multimodal_prompt(off, {"prompt": I_PH, "multi_modal_data": {"image": item}})

    engine = make_engine(model_dir, enable_mm_embeds=True)
    forms = [
        item,
        {"image_embeds": torch.tensor(good), "image_grid_thw": torch.tensor(grid)},
        {"image_embeds": base64.b64encode(_npy(good)).decode(), "image_grid_thw": list(grid)},
    ]
    for form in forms:
        _, ids, mm = prepare_multimodal_prompt(
            engine, {"prompt": f"a {I_PH} b", "multi_modal_data": {"image": form}}
        )
        np.testing.assert_allclose(mm.items[0].data, good, rtol=0, atol=0)
        assert ids.count(engine.runner.model_obj.ids["image"]) == 6
    # the explicit modality name works too
    _, _, mm = prepare_multimodal_prompt(
        engine, {"prompt": I_PH, "multi_modal_data": {"image_embeds": item}}
    )
    assert mm.items[0].modality == "image"
    assert engine.runner.model_obj.calls == []  # embeddings are never processed

    with pytest.raises(ValueError, match=r"expected \(6, 8\), got \(5, 8\)"):
        prepare_multimodal_prompt(
            engine,
            {"prompt": I_PH, "multi_modal_data": {"image": {**item, "image_embeds": good[:5]}}},
        )
    with pytest.raises(ValueError, match="needs grid_thw"):
        prepare_multimodal_prompt(engine, {"prompt": I_PH, "multi_modal_data": {"image": good}})
    with pytest.raises(ValueError, match="3 ints"):
        prepare_multimodal_prompt(
            engine,
            {"prompt": I_PH, "multi_modal_data": {"image": {**item, "image_grid_thw": [1, 2]}}},
        )


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_placeholder_mismatch_and_pre_expanded_ids(model_dir):
    engine = make_engine(model_dir)
    img = image(16, 24, 8)  # 6 tokens
    with pytest.raises(ValueError, match="1 .* placeholder\\(s\\) for 2 image item"):
        prepare_multimodal_prompt(
            engine, {"prompt": f"x {I_PH}", "multi_modal_data": {"image": [img, img]}}
        )
    with pytest.raises(ValueError, match="0 .* placeholder\\(s\\) for 1 image"):
        prepare_multimodal_prompt(engine, {"prompt": "no slot", "multi_modal_data": {"image": img}})
    _, ids, _ = prepare_multimodal_prompt(
        engine, {"prompt": f"x {I_PH} y", "multi_modal_data": {"image": img}}
    )
    # token ids that already hold the expanded placeholders are taken as they are
    _, again, mm = prepare_multimodal_prompt(
        engine, {"prompt_token_ids": ids, "multi_modal_data": {"image": img}}
    )
    assert again == ids and mm.items[0].end - mm.items[0].start == 6
    bad = [t for t in ids]
    bad.remove(engine.runner.model_obj.ids["image"])  # a run of 5 for a 6-token image
    with pytest.raises(ValueError, match="takes 6 placeholder tokens; the prompt has a run of 5"):
        prepare_multimodal_prompt(
            engine, {"prompt_token_ids": bad, "multi_modal_data": {"image": img}}
        )


def test_videos_and_media_io_kwargs(model_dir):
    engine = make_engine(model_dir, media_io_kwargs={"video": {"num_frames": 4}})
    frames = np.random.RandomState(0).randint(0, 255, (8, 16, 24, 3), np.uint8)
    _, ids, mm = prepare_multimodal_prompt(
        engine, {"prompt": f"v {V_PH}", "multi_modal_data": {"video": (frames, {"fps": 8.0})}}
    )
    item = mm.items[0]
    # 4 of 8 frames kept (every other one: 4 fps), 2 temporal patches of a 4x6 grid
    assert item.meta["grid_thw"] == (2, 4, 6) and item.end - item.start == 12
    assert item.meta["second_per_grid_t"] == pytest.approx(2 / 4.0)
    assert engine.runner.model_obj.calls == ["video"]
    with pytest.raises(ValueError, match=r"unknown options \['frames'\]"):
        prepare_multimodal_prompt(
            engine,
            {
                "prompt": V_PH,
                "multi_modal_data": {"video": frames},
                "media_io_kwargs": {"video": {"frames": 2}},
            },
        )
    with pytest.raises(ValueError, match="unknown prompt keys"):
        prepare_multimodal_prompt(
            engine, {"prompt": V_PH, "multi_modal_data": {"video": frames}, "x": 1}
        )


def test_mrope_positions_continue_after_the_prompt():
    pos = np.array([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    item = PlacedItem(1, 5, "image", "k", np.ones((4, D), np.float32))
    mm = MultimodalRequest([item], 6, mrope_positions=pos, mrope_delta=-2)
    step = SeqStep([0] * 4, 4, [], sample=True)  # 2 prompt tokens + 2 decode tokens
    mm.fill_step(step, None, 4, 4)
    np.testing.assert_array_equal(step.mrope_positions, [[1, 3, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5]])
    decode = SeqStep([0], 9, [], sample=True)
    mm.fill_step(decode, None, 9, 1)
    # after the prompt: one value on all three axes, start + position_offset (the runner
    # writes it without a per-token array)
    assert decode.mm_rows is None and decode.mrope_positions is None
    assert decode.start + decode.position_offset == 7
    salted = MultimodalRequest([item], 6, cache_salt="s")
    assert salted.extra_keys[-1][2] == "salt:s"


def test_encoder_cache_is_lru_by_bytes():
    cache = EncoderCache(capacity_bytes=3 * 4 * D)  # three rows of D float32
    row = lambda v: EncoderOutput("image", np.full((1, D), v, np.float32), 1)  # noqa: E731
    for key in "abc":
        cache.put(key, row(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", row(2))  # evicts b, the least recently used
    assert "b" not in cache and all(k in cache for k in "acd")
    cache.put("big", EncoderOutput("image", np.zeros((4, D), np.float32), 4))  # never kept
    assert "big" not in cache and cache.nbytes == 3 * 4 * D
    assert cache.hits == 1


def test_chat_parts_become_items(model_dir, tmp_path):
    engine = make_engine(model_dir, enable_mm_embeds=True)
    img = image(16, 24, 9)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    embeds = {"image_embeds": np.zeros((6, D), np.float32), "image_grid_thw": [1, 4, 6]}
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    conv = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": url}, "uuid": "u1"},
                {"type": "image_pil", "image_pil": img},
                {"type": "image_embeds", "image_embeds": embeds},
                {"type": "video", "video": frames},
            ],
        },
    ]
    prompt = conversation_to_mm_prompt(engine, conv)
    assert prompt["prompt"].count(I_PH) == 3 and prompt["prompt"].count(V_PH) == 1
    assert prompt["multi_modal_uuids"] == {"image": ["u1", None, None], "video": [None]}
    text, ids, mm = prepare_multimodal_prompt(engine, prompt)
    assert [it.modality for it in mm.items] == ["image", "image", "image", "video"]
    assert mm.items[0].key == "u1"
    pixels = [it.data["pixel_values"] for it in mm.items[:2]]
    np.testing.assert_array_equal(*pixels)  # same picture

    # a template that takes strings gets the placeholder text in the message
    plain = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    prompt = conversation_to_mm_prompt(
        engine,
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_pil", "image_pil": img},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
        chat_template=plain,
    )
    assert prompt["prompt"] == f"[{I_PH}\nhi]"
    with pytest.raises(ValueError, match="'input_audio' is not supported"):
        conversation_to_mm_prompt(
            engine, [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
        )


def test_file_urls_need_an_allowed_directory(model_dir, tmp_path):
    path = os.path.join(tmp_path, "cat.png")
    with open(path, "wb") as f:
        f.write(png_bytes(image(16, 16, 11)))
    prompt = {"prompt": I_PH, "multi_modal_data": {"image": f"file://{path}"}}
    with pytest.raises(ValueError, match="file"):
        prepare_multimodal_prompt(make_engine(model_dir), prompt)
    allowed = make_engine(model_dir, allowed_local_media_path=str(tmp_path))
    _, _, mm = prepare_multimodal_prompt(allowed, prompt)
    assert len(mm.items) == 1


def test_text_only_models_refuse_media(model_dir):
    engine = make_engine(model_dir)
    engine.runner.model_obj = SimpleNamespace()
    with pytest.raises(ValueError, match="text-only model"):
        prepare_multimodal_prompt(
            engine, {"prompt": "x", "multi_modal_data": {"image": image(8, 8, 0)}}
        )
