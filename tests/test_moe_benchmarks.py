"""MoE benchmark scripts end to end at a tiny shape (smoke tests, not timings)."""

import json

from benchmarks import moe_layer


def test_moe_layer_smoke(capsys):
    result = moe_layer.main(["--smoke"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    rows = result["rows"]
    assert {(r["T"], r["impl"]) for r in rows} == {
        (T, impl) for T in (1, 16) for impl in ("dense", "ragged", "capacity", "gather")
    }
    for r in rows:
        assert r["ms"] > 0 and r["touched_GBps"] > 0
        # the bytes of the experts one routing touches: at least k, at most E experts
        per_expert = 3 * 32 * 16 * 4
        assert 2 * per_expert <= r["touched_expert_bytes"] <= 8 * per_expert
    assert sum(r["default"] for r in rows) == 2  # one `auto` choice per token count
