"""Benchmark scripts run end to end at a tiny shape (smoke tests, not timings)."""

import json

from benchmarks import throughput


def test_throughput_smoke(tmp_path, capsys):
    result = throughput.main(
        [
            "--config",
            "tiny",
            "--num-prompts",
            "4",
            "--input-len",
            "20",
            "--output-len",
            "6",
            "--workdir",
            str(tmp_path),
        ]
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result
    assert result["output_tokens_per_s"] > 0 and result["jax_version"]
