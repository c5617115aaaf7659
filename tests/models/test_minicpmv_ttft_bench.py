"""benchmarks/minicpmv_ttft.py end to end at a tiny shape on CPU (smoke, not timings)."""

import json

from benchmarks import minicpmv_ttft


def test_minicpmv_ttft_smoke(tmp_path, capsys):
    results = minicpmv_ttft.main(
        ["--config", "small", "--sizes", "120x50", "--iters", "1", "--device", "cpu"]
        + ["--workdir", str(tmp_path)]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-1:]]
    assert lines == results
    (r,) = results
    # 120x50 (w x h) past 56^2: a 1x2 grid of slices + the source view
    assert r["image_size"] == [120, 50] and r["num_sub_images"] == 3
    assert r["warm"] and r["num_prompt_tokens"] > r["num_image_tokens"] == 3 + 4 + 4
    assert r["num_prompt_tokens"] == r["hf_prompt_tokens"]  # the same prompt on both sides
    for key in ("preprocess_s", "encoder_s", "prefill_s", "e2e_s", "hf_e2e_s"):
        assert r[key] > 0, key
    assert r["speedup_vs_hf"] > 0 and r["hf_device"] == "cpu"
    assert r["jax_version"] and r["transformers_version"]


def test_checkpoint_has_the_medium_shapes(tmp_path):
    cfg, tok = minicpmv_ttft.write_checkpoint("medium", str(tmp_path))
    assert cfg.text_config.hidden_size == 2048 and cfg.vision_config.num_hidden_layers == 27
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < 152000
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["MiniCPMV4_6ForConditionalGeneration"]
