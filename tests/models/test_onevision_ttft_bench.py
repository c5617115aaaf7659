"""benchmarks/onevision_ttft.py end to end at a tiny shape on CPU (smoke, not timings)."""

import json

from benchmarks import onevision_ttft


def test_onevision_ttft_smoke(tmp_path, capsys):
    results = onevision_ttft.main(
        ["--config", "small", "--sizes", "84x40", "--iters", "1", "--device", "cpu"]
        + ["--workdir", str(tmp_path)]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-1:]]
    assert lines == results
    # 84x40 (w x h) fits whole in the 56x84 (h x w) pinpoint: 2 x 3 tiles + base
    assert results[0]["image_size"] == [84, 40] and results[0]["num_tiles"] == 7
    for r in results:
        assert r["warm"] and r["num_prompt_tokens"] > r["num_image_tokens"]
        for key in ("preprocess_s", "encoder_s", "prefill_s", "e2e_s", "hf_e2e_s"):
            assert r[key] > 0, key
        assert r["speedup_vs_hf"] > 0 and r["hf_device"] == "cpu"
        assert r["jax_version"] and r["transformers_version"]


def test_checkpoint_has_the_0_5b_shapes(tmp_path):
    cfg, tok = onevision_ttft.write_checkpoint("onevision-0.5b", str(tmp_path))
    assert cfg.text_config.hidden_size == 896 and cfg.vision_config.num_hidden_layers == 26
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>") < 152000
    assert len(cfg.image_grid_pinpoints) == 36 and cfg.image_grid_pinpoints[1] == [384, 768]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
