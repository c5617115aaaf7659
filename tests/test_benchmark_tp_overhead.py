"""benchmarks/tp_overhead.py end to end at a tiny shape on CPU (a smoke test, not timings)."""

import json

from benchmarks import tp_overhead


def test_tp_overhead_smoke(tmp_path, capsys):
    result = tp_overhead.main(
        ["--config", "tiny", "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
         "--short", "2", "--long", "6", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
         "--kv-cache-bytes", str(16 << 20), "--rounds", "1", "--no-warmup",
         "--workdir", str(tmp_path)]
    )  # fmt: skip
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result
    assert set(result["variants"]) == {"shard_map", "plain"}
    for v in result["variants"].values():
        assert v["output_tokens_per_s"] > 0 and v["decode_ms_per_token"] > 0
    assert isinstance(result["decode_overhead_pct"], float) and result["jax_version"]
