"""benchmarks/vlm_ttft.py end to end at the small Qwen2-VL shape on CPU (smoke, not timings)."""

import json

from benchmarks import vlm_ttft


def test_vlm_ttft_smoke(tmp_path, capsys):
    results = vlm_ttft.main(
        ["--config", "small", "--sizes", "56", "112", "--iters", "1", "--device", "cpu"]
        + ["--workdir", str(tmp_path)]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert lines == results
    small, large = results
    assert small["image_size"] == [56, 56] and small["grid_thw"] == [1, 4, 4]
    assert large["grid_thw"] == [1, 8, 8] and large["num_image_tokens"] == 16
    for r in results:
        assert r["warm"] and r["num_prompt_tokens"] > r["num_image_tokens"]
        for key in ("preprocess_s", "encoder_s", "prefill_s", "e2e_s", "hf_e2e_s"):
            assert r[key] > 0, key
        assert r["speedup_vs_hf"] > 0 and r["hf_device"] == "cpu"
        assert r["jax_version"] and r["torch_version"] and r["transformers_version"]


def test_checkpoint_matches_qwen2_vl_2b_shapes(tmp_path):
    cfg, tok = vlm_ttft.write_checkpoint("qwen2-vl-2b", str(tmp_path))
    assert cfg.text_config.hidden_size == 1536 and cfg.vision_config.depth == 32
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < 151936
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert saved["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(str(tmp_path))
    out = ip(images=[vlm_ttft.Images()(1344)], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 96, 96]]  # 1344^2 is kept as is
