"""CPU smoke test of benchmarks/serving.py: a few Poisson-timed streaming requests against an
in-process server over the tiny random config, then the same workload offline."""

from __future__ import annotations

import json

from benchmarks import serving


def test_serving_bench_smoke(tmp_path, capsys):
    result = serving.main(
        [
            "--config", "tiny",
            "--num-requests", "6",
            "--request-rate", "40",
            "--input-len", "12",
            "--output-len", "5",
            "--max-num-seqs", "8",
            "--no-warmup",
            "--workdir", str(tmp_path),
        ]
    )  # fmt: skip
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == json.loads(json.dumps(result))
    for side in ("server", "offline"):
        r = result[side]
        assert r["completed"] == 6 and r["failed"] == 0, r
        for metric in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert 0 <= r[metric]["p50"] <= r[metric]["p90"] <= r[metric]["p99"]
        assert r["output_tokens_per_s"] > 0
    assert result["server"]["output_tokens_per_s"] / result["offline"]["output_tokens_per_s"] > 0
    assert "ttft_overhead_ms_p50" in result and "throughput_ratio" in result


def test_percentiles_and_workload():
    import argparse

    p = serving.percentiles([0.001, 0.002, 0.003])
    assert p["p50"] == 2.0
    args = argparse.Namespace(seed=0, num_requests=50, request_rate=10.0, input_len=4)
    prompts, offsets = serving.workload(args, 100)
    assert len(prompts) == 50 and all(len(x) == 4 and max(x) < 100 for x in prompts)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert 2.0 < offsets[-1] < 10.0  # 49 gaps of mean 0.1 s
