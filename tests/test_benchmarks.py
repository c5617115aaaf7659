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


def test_results_files_are_indexed():
    """benchmarks/results: one file per benchmark and device, no session numbers in names,
    each file and each run of the .json files listed in INDEX.md; JSON lines parse."""
    import re
    from pathlib import Path

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    index = (results / "INDEX.md").read_text()
    files = sorted(p.name for p in results.iterdir() if p.name != "INDEX.md")
    assert files
    for name in files:
        assert re.fullmatch(r"[a-z0-9_]+_(h100|2core)\.jsonl?", name), name
        assert not re.search(r"_s\d+_|session", name), name
        assert f"`{name}`" in index, f"{name} missing from INDEX.md"
        if name.endswith(".jsonl"):
            for line in (results / name).read_text().splitlines():
                assert isinstance(json.loads(line), dict)
            continue
        data = json.loads((results / name).read_text())
        assert data["device"] and data["script"] and data["runs"]
        variants = [r["variant"] for r in data["runs"]]
        assert len(set(variants)) == len(variants), name
        for r in data["runs"]:
            assert r["date"] and r["env"]["device"] == data["device"]
            assert f"`{r['variant']}`" in index, f"run {r['variant']} of {name} not in INDEX.md"


def test_run_writer_appends_and_keeps_earlier_runs(tmp_path):
    from benchmarks.results_io import RunWriter, select_run

    path = tmp_path / "attention_decode_h100.json"
    bare = dict(env=dict(device="GPU", date="2026-01-01"), rows=[dict(ms=1.0)])
    path.write_text(json.dumps(bare))  # a file as the scripts wrote it before
    w = RunWriter(path, benchmark="b", script="s.py", variant="new", env=dict(device="GPU"))
    w.write(rows=[dict(ms=2.0)])
    w.write(rows=[dict(ms=2.0), dict(ms=3.0)])  # rewritten after each row: still one run
    data = json.loads(path.read_text())
    assert [r.get("variant") for r in data["runs"]] == [None, "new"]
    assert data["runs"][0] == bare and data["device"] == "GPU"
    assert select_run(data, "new")["rows"] == [dict(ms=2.0), dict(ms=3.0)]
    assert select_run(data)["variant"] == "new" and select_run(bare) is bare


def test_structured_throughput_smoke(tmp_path, capsys):
    from benchmarks import structured_throughput

    out = tmp_path / "lines.jsonl"
    out.write_text('{"earlier": 1}\n')  # --out appends
    args = ["--config", "tiny", "--num-prompts", "4", "--input-len", "12", "--output-len", "6"]
    args += ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--mixed-fraction", "0.25"]
    results = structured_throughput.main([*args, "--workdir", str(tmp_path), "--out", str(out)])
    printed = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-3:]]
    assert printed == results
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"earlier": 1}, *results]
    free, constrained, mixed = results
    assert [r["case"] for r in results] == ["unconstrained", "json_schema", "mixed_25pct"]
    assert [r["constrained_requests"] for r in results] == [0, 4, 1]
    for r in results:
        assert r["output_tokens"] == 4 * 6 and r["output_tokens_per_s"] > 0
        assert r["device"] and r["jax_version"] and r["transformers_version"]
        assert 0 <= r["mask_total_s"] < r["elapsed_s"]
        # the schema's array outlasts 6 tokens: every constrained document is whole and valid
        assert r["constrained_document_tokens"] == (
            {"6": r["constrained_requests"]} if r["constrained_requests"] else {}
        )
        assert r["constrained_outputs_valid"] == r["constrained_requests"]
    assert free["loss_vs_unconstrained_pct"] == 0 and free["mask_steps"] == 0
    assert free["mask_rows"] == 0 and free["advance_s"] == 0
    # one mask per constrained request and output token, filled once per step
    assert constrained["mask_rows"] == 4 * 6 and mixed["mask_rows"] == 6
    for r in (constrained, mixed):  # prefill chunks may put requests a step apart
        assert 6 <= r["mask_steps"] <= r["engine_steps"]
    assert constrained["mask_per_step_p99_ms"] >= constrained["mask_per_step_mean_ms"] > 0


def test_ttft_rounds_run_warm_first_then_in_order():
    """ttft_common.time_rounds: one untimed round, then `iters` rounds, the runs of a round
    in their order (each draws its fresh input in that order); a None run is left out."""
    from benchmarks import ttft_common as tc

    calls = []

    def run(name):
        return lambda i: calls.append((name, i)) or f"{name}{i}"

    warm, (a, b, c) = tc.time_rounds(2, run("a"), run("b"), None)
    assert warm == ["a0", "b0", None] and (a, b, c) == (["a1", "a2"], ["b1", "b2"], [])
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]

    runs = [dict(preprocess_s=0.1, encoder_s=0.2, prefill_s=0.3)] * 3
    r = tc.ttft_fields(runs, [1.0, 2.0, 9.0])
    assert r == dict(preprocess_s=0.1, encoder_s=0.2, prefill_s=0.3, e2e_s=2.0, other_s=1.4)
    hf = [dict(hf_processor_s=1.0, hf_model_s=3.0), dict(hf_processor_s=2.0, hf_model_s=4.0)]
    h = tc.hf_fields(hf, 2.0, "cpu")
    assert h == dict(
        hf_processor_s=1.5, hf_model_s=3.5, hf_e2e_s=5.0, speedup_vs_hf=2.5, hf_device="cpu"
    )
    # the environment fields a script asks for, and only those (its JSON keys stay its own)
    keys = "device backend jax_version torch_version transformers_version date".split()
    assert list(tc.env_fields(python=False)) == keys
    assert {"jaxmm_version", "python"} <= set(tc.env_fields(jaxmm_version=True))
