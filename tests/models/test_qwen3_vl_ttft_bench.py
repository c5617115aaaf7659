"""benchmarks/qwen3_vl_ttft.py end to end at its small shape on CPU (smoke, not timings)."""

import json

from benchmarks import qwen3_vl_ttft


def test_qwen3_vl_ttft_smoke(tmp_path, capsys):
    results = qwen3_vl_ttft.main(
        ["--config", "small", "--sizes", "256", "--iters", "1", "--device", "cpu"]
        + ["--max-num-batched-tokens", "256", "--workdir", str(tmp_path)]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-1:]]
    assert lines == results
    # the real pixel budget (at least 256^2) and 16-pixel patches
    assert results[0]["image_size"] == [256, 256] and results[0]["grid_thw"] == [1, 16, 16]
    assert results[0]["num_image_tokens"] == 64
    for r in results:
        assert r["benchmark"] == "qwen3_vl_ttft" and r["encoder_row_width"] == 64 * 3
        assert r["warm"] and r["num_prompt_tokens"] > r["num_image_tokens"]
        for key in ("preprocess_s", "encoder_s", "prefill_s", "e2e_s", "hf_e2e_s"):
            assert r[key] > 0, key
        assert r["speedup_vs_hf"] > 0 and r["hf_device"] == "cpu"


def test_checkpoint_matches_qwen3_vl_2b_shapes(tmp_path):
    cfg, tok = qwen3_vl_ttft.write_checkpoint("qwen3-vl-2b", str(tmp_path))
    assert cfg.text_config.hidden_size == 2048 and cfg.vision_config.depth == 24
    assert cfg.vision_config.deepstack_visual_indexes == [5, 11, 17]
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < 151936
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3VLForConditionalGeneration"]
    from transformers import AutoImageProcessor

    from benchmarks.vlm_ttft import Images

    ip = AutoImageProcessor.from_pretrained(str(tmp_path))
    out = ip(images=[Images()(1344)], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 84, 84]]  # 1344^2 is kept as is
