"""CPU smoke test of benchmarks/vlm_serving.py: image chat requests (data: URIs, repeats by
uuid) streamed to an in-process server over a small random Qwen2-VL, the same workload
through the offline engine, and transformers as the peer; plus its workload generator."""

from __future__ import annotations

import argparse
import base64
import io
import json

from PIL import Image

from benchmarks import vlm_serving


def test_vlm_serving_bench_smoke(tmp_path, capsys):
    lines = vlm_serving.main(["--smoke", "--workdir", str(tmp_path)])
    printed = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert printed == json.loads(json.dumps(lines))
    *loads, summary = lines
    assert [x["load"] for x in loads] == ["rate=50", "rate=100", "rate=200", "burst"]
    for x in loads:
        n = x["num_requests"]
        assert n == (4 if x["load"] == "burst" else 3)
        assert x["repeated_by_uuid"] == round(0.3 * n)
        assert x["distinct_images"] + x["repeated_by_uuid"] == n
        for side in ("server", "offline"):
            r = x[side]
            # every request completed, on both sides
            assert r["completed"] == n and r["failed"] == 0, r
            for metric in ("ttft_ms", "e2e_ms"):
                assert 0 <= r[metric]["p50"] <= r[metric]["p90"] <= r[metric]["p99"]
            assert r["output_tokens_per_s"] > 0 and r["images_per_s"] > 0
            # the vision tower ran on the images (repeats by uuid may be served from cache)
            assert 1 <= r["encoded_images"] <= n
            # no warmup here: the first shapes may compile inside the loads
            assert isinstance(r["compilations"], int) and r["compilations"] >= 0
            # every request streamed its 4 tokens
            assert abs(r["output_tokens_per_s"] / r["requests_per_s"] - 4) < 0.1, r
        # the server and the engine saw the same prompts
        assert x["prompt_tokens_match"] is True
        assert x["images_per_s_ratio"] > 0 and "ttft_overhead_ms_p50" in x
    assert summary["summary"] is True and summary["backend"] == "cpu"
    for key in ("jax_version", "transformers_version", "device", "limits", "start_s"):
        assert key in summary
    t = summary["targets"]
    burst = loads[-1]
    assert t["http_vs_offline_at_saturation"]["value"] == burst["images_per_s_ratio"]
    assert t["ttft_p50_overhead_ms_low_load"]["value"] == loads[0]["ttft_overhead_ms_p50"]
    assert summary["hf_images_per_s"] > 0 and summary["hf_prompts"] == 2
    want = round(burst["server"]["images_per_s"] / summary["hf_images_per_s"], 2)
    assert t["images_per_s_vs_hf_at_saturation"]["value"] == want
    for v in t.values():
        assert v["met"] in (True, False)


def _decode(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert head == f"data:image/{img.format.lower()};base64"
    return img


def test_workload_mixes_sizes_formats_and_uuid_repeats():
    args = argparse.Namespace(seed=3, repeat=0.3, mix=0.5, sizes=[56, 84], image_format="mixed")
    load = vlm_serving.make_load(args, 1, "rate=10", 10.0, 40)
    assert sum(load.repeat) == 12 and len(load.images) == 28 == len(load.uuids)
    assert not load.repeat[0]
    assert len(set(load.uuids)) == 28
    for i, k in enumerate(load.which):
        # a repeat shows an image an earlier request showed first, under its uuid
        first = load.which.index(k)
        assert first <= i and (first == i) != load.repeat[i]
    formats = {_decode(u).format for u in load.images}
    assert formats == {"PNG", "JPEG"}
    assert [_decode(u).size[0] for u in load.images] == load.sizes
    assert set(load.sizes) == {56, 84}
    assert load.offsets[0] == 0.0 and load.offsets == sorted(load.offsets)
    assert 1.0 < load.offsets[-1] < 10.0  # 39 gaps of mean 0.1 s
    burst = vlm_serving.make_load(args, 4, "burst", float("inf"), 8)
    assert burst.offsets == [0.0] * 8
    # a uuid-only repeat sends no media; the first showing always does
    i = load.repeat.index(True)
    assert vlm_serving.image_value(load, i, "none") is None
    assert vlm_serving.image_value(load, i, "full") == load.images[load.which[i]]
    body = vlm_serving.chat_body(load, i, "m", {"output_len": 4, "repeat_media": "none"})
    part = body["messages"][1]["content"][0]
    assert part == {"type": "image_url", "image_url": None, "uuid": load.uuids[load.which[i]]}
