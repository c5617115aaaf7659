"""`use_audio_in_video` pairing in the front end (`multimodal/audio_in_video.py`), on fake
items and a fake model: no engine, milliseconds. The parity tests with a real checkpoint
are in tests/models/test_qwen2_5_omni.py."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmm.multimodal.audio_in_video import has_vision_items, join_audio_in_video, pop_option
from jaxmm.multimodal.cache import EncoderOutput
from jaxmm.multimodal.inputs import _Item


class Model:
    """Writes a span of 2 markers + the video's rows + the audio's rows."""

    mm_audio_in_video = True

    def mm_span_ids(self, modality, item, encode_text):
        del encode_text
        n_audio = len(item["audio"]["rows"])
        return [1] + [7] * item["video_rows"] + [8] * n_audio + [2]

    def mm_num_tokens(self, modality, item):
        return len(item["span_ids"])


def _item(modality: str, index: int, key: str, data, rows: int) -> _Item:
    return _Item(
        modality, index, None, "media", key=key, output=EncoderOutput(modality, data, rows)
    )


def _video(i: int, key: str = "v") -> _Item:
    return _item("video", i, f"{key}{i}", {"video_rows": 3}, 3)


def _audio(i: int, key: str = "a") -> _Item:
    return _item("audio", i, f"{key}{i}", {"rows": [0] * 4}, 4)


def test_each_video_takes_its_track_in_order():
    videos, tracks = [_video(0), _video(1)], [_audio(0), _audio(1, "b")]
    image = _item("image", 0, "i0", {}, 5)
    items = join_audio_in_video(Model(), [image, *videos], tracks, None)
    assert [it.modality for it in items] == ["image", "video", "video"]  # tracks left
    assert [it.output.num_rows for it in items] == [5, 9, 9]
    assert items[1].output.meta["span_ids"] == [1, 7, 7, 7, 8, 8, 8, 8, 2]
    assert items[1].output.data["audio"] is tracks[0].output.data
    assert items[2].output.data["audio"] is tracks[1].output.data
    # the key names both the video and its track: another track, another key
    again = join_audio_in_video(Model(), [_video(0)], [_audio(0, "c")], None)
    assert len({items[1].key, items[2].key, again[0].key, "v0"}) == 4


def test_pairing_refusals():
    with pytest.raises(ValueError, match="1 video.* and 2 audio item"):
        join_audio_in_video(Model(), [_video(0)], [_audio(0), _audio(1)], None)
    embeds = _item("audio", 0, "e", np.zeros((4, 8), np.float32), 4)
    with pytest.raises(ValueError, match="not precomputed embeddings"):
        join_audio_in_video(Model(), [_video(0)], [embeds], None)
    with pytest.raises(ValueError, match="does not take use_audio_in_video"):
        join_audio_in_video(object(), [_video(0)], [_audio(0)], None)
    # no video: no track to take, the audio stays an item of its own
    alone = join_audio_in_video(Model(), [], [_audio(0)], None)
    assert [it.modality for it in alone] == ["audio"]


def test_option_and_routing_helpers():
    kwargs = {"use_audio_in_video": True, "max_pixels": 64}
    assert pop_option(kwargs) is True and kwargs == {"max_pixels": 64}
    assert pop_option({}, default=True) is True and pop_option({}) is False
    with pytest.raises(ValueError, match="must be a bool"):
        pop_option({"use_audio_in_video": "yes"})
    assert has_vision_items({"multi_modal_data": {"audio": 1, "video": 2}})
    assert not has_vision_items({"multi_modal_data": {"audio": 1, "audio_embeds": 2}})
