"""benchmarks/mm_embed.py end to end at the small Qwen2-VL shape on CPU (smoke, not timings)."""

import json

from benchmarks import mm_embed


def test_mm_embed_smoke(tmp_path, capsys):
    args = ["--config", "small", "--sizes", "56", "--num-prompts", "4", "--hf-batch", "2"]
    args += ["--max-num-batched-tokens", "256", "--device", "cpu", "--workdir", str(tmp_path)]
    [result] = mm_embed.main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["num_prompts"] == 4 and result["prompt_tokens"] > 16  # 16 image tokens
    assert result["jaxmm_embeds_per_s"] > 0 and result["hf_embeds_per_s"] > 0
    assert result["jaxmm_compilations"] == 0  # the warm call compiled every program
    assert result["speedup_vs_hf"] > 0 and result["hf_device"] == "cpu"
