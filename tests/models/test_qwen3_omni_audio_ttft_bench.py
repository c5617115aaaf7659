"""benchmarks/qwen3_omni_audio_ttft.py end to end at its small shape on CPU (smoke, not timings)."""

import json

from benchmarks import qwen3_omni_audio_ttft


def test_qwen3_omni_audio_ttft_smoke(tmp_path, capsys):
    results = qwen3_omni_audio_ttft.main(
        ["--config", "small", "--layers", "1", "--seconds", "2.3", "--iters", "1"]
        + ["--device", "cpu", "--max-num-batched-tokens", "64", "--hf-experts", "eager"]
        + ["--workdir", str(tmp_path)]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-1:]]
    assert lines == results
    (r,) = results
    # 2.3 s: 230 frames, chunks of 100, 100 and 30 frames -> 13 + 13 + 4 rows
    assert r["benchmark"] == "qwen3_omni_audio_ttft" and r["num_audio_tokens"] == 30
    assert r["warm"] and r["num_prompt_tokens"] > r["num_audio_tokens"]
    for key in ("e2e_s", "encoder_s", "hf_e2e_s", "hf_encoder_s"):
        assert r[key] > 0, key
    assert r["speedup_vs_hf"] > 0 and r["hf_device"] == "cpu"
    assert r["hf_experts_implementation"] == "eager"


def test_checkpoint_has_the_omni_shape(tmp_path):
    cfg, tok, fe = qwen3_omni_audio_ttft.write_checkpoint("omni-30b-a3b", 2, str(tmp_path))
    assert cfg.audio_config.d_model == 1280 and cfg.audio_config.encoder_layers == 32
    assert cfg.text_config.num_experts == 128 and cfg.text_config.num_hidden_layers == 2
    assert cfg.audio_token_id == tok.convert_tokens_to_ids("<|audio_pad|>") < 151936
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3OmniMoeThinkerForConditionalGeneration"]
    assert fe.feature_size == 128 and (tmp_path / "preprocessor_config.json").exists()
