"""benchmarks/hybrid_decode.py end to end at a tiny shape on CPU (smoke, not timings)."""

import json

from benchmarks import hybrid_decode


def test_hybrid_decode_smoke(tmp_path, capsys):
    result = hybrid_decode.main(["--config", "tiny", "--workdir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    hybrid, full = result["hybrid"], result["full_attention"]
    assert hybrid["prefill_s"] > 0 and full["prefill_s"] > 0 and result["prefill_len"] == 100
    # 3 of 4 layers are linear: (conv state + float32 recurrent state) each, per sequence
    conv, rec = 3 * (2 * 2 * 16 + 4 * 16) * 4, 4 * 16 * 16 * 4
    assert hybrid["state_bytes_per_sequence"] == 3 * (conv + rec)
    # engine time per token is a difference of two timings: noise on a busy CPU
    assert hybrid["roofline_ms_per_token"] > 0 and isinstance(hybrid["engine_ms_per_token"], float)
    assert hybrid["device_step_ms"] > 0 and result["jax_version"]


def test_config_layer_pattern():
    cfg = hybrid_decode.hf_config("qwen3.5-9b", full_attention=False)
    assert cfg["layer_types"].count("full_attention") == 8 and len(cfg["layer_types"]) == 32
    assert set(hybrid_decode.hf_config("tiny", True)["layer_types"]) == {"full_attention"}
