"""MoE benchmark scripts end to end at a tiny shape (smoke tests, not timings)."""

import json

from benchmarks import moe_layer


def test_moe_layer_smoke(capsys):
    result = moe_layer.main(["--smoke"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    rows = result["rows"]
    impls = ("dense", "ragged", "capacity", "gather", "pallas", "mosaic_gpu")
    assert {(r["T"], r["impl"]) for r in rows} == {(T, impl) for T in (1, 16) for impl in impls}
    skipped = [r for r in rows if "skipped" in r]  # off a Hopper GPU, with the reason
    assert {r["impl"] for r in skipped} == {"mosaic_gpu"} and "Hopper" in skipped[0]["skipped"]
    rows = [r for r in rows if "skipped" not in r]
    for r in rows:
        assert r["ms"] > 0 and r["touched_GBps"] > 0 and r["max_abs_err"] < 1e-5
        # the bytes of the experts one routing touches: at least k, at most E experts
        per_expert = 3 * 32 * 16 * 4
        assert 2 * per_expert <= r["touched_expert_bytes"] <= 8 * per_expert
    assert sum(r["default"] for r in rows) == 2  # one `auto` choice per token count


def _jaxmm_param_count(cfg: dict) -> int:
    import jax
    import transformers
    from flax import nnx

    from jaxmm.models.qwen3_moe import Qwen3MoeForCausalLM

    skip = ("architectures", "model_type", "torch_dtype")
    config = transformers.Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k not in skip})
    model = nnx.eval_shape(lambda: Qwen3MoeForCausalLM(config, rngs=nnx.Rngs(0)))
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def test_moe_decode_roofline_counts_the_models_parameters():
    """The roofline and bound count exactly the parameters the jaxmm model holds (the
    Qwen3-30B-A3B shape: about 30.5B in all, 3.3B of them active per token)."""
    from benchmarks import moe_decode

    for name in ("tiny", "qwen3-30b-a3b"):
        cfg = moe_decode.CONFIGS[name]
        p = moe_decode.param_counts(cfg)
        assert p["total"] == _jaxmm_param_count(cfg), name
    active = p["shared"] + p["sparse_layers"] * p["k"] * p["expert"]
    # the model card's 3.3B active counts the embedding table; a token reads one row of it
    embedding = cfg["vocab_size"] * cfg["hidden_size"]
    assert 30.0e9 < p["total"] < 31.0e9 and 3.3e9 < active + embedding < 3.4e9
    assert abs(moe_decode.expected_experts(128, 8, 1) - 8) < 1e-9
    assert 127 < moe_decode.expected_experts(128, 8, 512) <= 128
