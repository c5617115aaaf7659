"""benchmarks/omni_av_ttft.py end to end at a tiny shape on the CPU (a smoke test, not a
timing): both engines read the one preprocessor_config.json and lay out the same prompt."""

import json


def test_omni_av_ttft_smoke(tmp_path, capsys):
    from benchmarks import omni_av_ttft

    args = ["--config", "small", "--frames", "4", "--size", "56", "--iters", "1"]
    (result,) = omni_av_ttft.main([*args, "--device", "cpu", "--workdir", str(tmp_path)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result
    # 4 frames of 56 px: 2 temporal patches of 14x14 patches, 49 merged tokens each
    assert result["num_prompt_tokens"] == result["hf_num_prompt_tokens"] > 2 * 49
    assert result["e2e_s"] > 0 and result["hf_e2e_s"] > 0 and result["speedup_vs_hf"] > 0
