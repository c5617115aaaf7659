"""The offline API end to end on a tiny random Llama: shapes of vLLM's API, stops, seeds, errors."""

import json
import os
import shutil

import pytest

from jaxmm import LLM, RequestOutput, SamplingParams
from jaxmm.runner.model_runner import backend_compile_count
from tests.helpers import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def path(ckpt_root):
    return make_checkpoint(ckpt_root, "llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, dtype="float32", max_model_len=128, max_num_batched_tokens=128)


def test_generate_mixed_prompts_in_order(llm):
    tok = llm.get_tokenizer()
    prompts = ["Hello, my name is", {"prompt": "The quick"}, {"prompt_token_ids": [1, 2, 3]}]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [type(o) for o in outs] == [RequestOutput] * 3
    assert outs[0].prompt == "Hello, my name is"
    assert outs[0].prompt_token_ids == tok("Hello, my name is").input_ids
    assert outs[2].prompt_token_ids == [1, 2, 3] and outs[2].prompt is None
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.index == 0 and len(c.token_ids) == 12
        assert c.finish_reason == "length" and c.stop_reason is None
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    # same prompt alone gives the same greedy tokens as in the batch
    alone = llm.generate("The quick", GREEDY, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_per_prompt_params_and_tqdm(llm, capsys):
    outs = llm.generate(
        ["a", "b"],
        [
            SamplingParams(max_tokens=3, ignore_eos=True),
            SamplingParams(max_tokens=5, ignore_eos=True),
        ],
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    assert "toks/s" in capsys.readouterr().err
    with pytest.raises(ValueError, match="2 prompts"):
        llm.generate(["a", "b"], [GREEDY])


def test_stop_string_not_in_text(llm):
    full = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate(
        "Hello",
        SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    keep = llm.generate(
        "Hello",
        SamplingParams(
            temperature=0,
            max_tokens=12,
            stop=stop,
            include_stop_str_in_output=True,
            ignore_eos=True,
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert keep.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    t = full[3]
    out = llm.generate(
        "Hello",
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[t], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    first = full.index(t)
    assert out.token_ids == full[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == t
    # min_tokens bans the stop token until it is reached
    out = llm.generate(
        "Hello",
        SamplingParams(
            temperature=0, max_tokens=8, min_tokens=6, stop_token_ids=[full[0]], ignore_eos=True
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert full[0] not in out.token_ids[:6] and len(out.token_ids) >= 6


def test_seed_reproducible_regardless_of_batch(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate("Once upon", sp, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    batch = llm.generate(["The", "Once upon", "JAX"], [others, sp, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_n_and_logprobs(llm):
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7, logprobs=4, ignore_eos=True)
    out = llm.generate("Hello", sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    for c in out.outputs:
        assert len(c.logprobs) == 6
        for tok, entry in zip(c.token_ids, c.logprobs):
            assert tok in entry and 4 <= len(entry) <= 5
            assert all(lp.logprob <= 0 for lp in entry.values())
        assert c.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)), abs=1e-4
        )


def test_chat(llm):
    out = llm.chat(
        [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4), use_tqdm=False
    )
    tok = llm.get_tokenizer()
    assert out[0].prompt == "<|user|>Hi<|end|><|assistant|>"
    assert (
        out[0].prompt_token_ids
        == tok("<|user|>Hi<|end|><|assistant|>", add_special_tokens=False).input_ids
    )
    outs = llm.chat(
        [
            [{"role": "user", "content": "a"}],
            [{"role": "user", "content": [{"type": "text", "text": "b"}]}],
        ],
        use_tqdm=False,
    )
    assert len(outs) == 2 and outs[1].prompt == "<|user|>b<|end|><|assistant|>"
    with pytest.raises(ValueError, match="multimodal"):
        llm.chat(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            use_tqdm=False,
        )


def test_bad_input(llm):
    long = {"prompt_token_ids": [5] * 200}
    with pytest.raises(ValueError, match=r"200 tokens.*128"):
        llm.generate(["fine", long], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing was half-started
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(TypeError, match="max_num_seqz"):
        LLM("x", max_num_seqz=3)


def test_bad_model(path, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="float8")
    with pytest.raises(FileNotFoundError, match="does not download"):
        LLM("meta-llama/Llama-3-8B")
    other = tmp_path / "odd"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(other))


def test_chat_without_template(path, tmp_path):
    other = tmp_path / "notemplate"
    shutil.copytree(path, other)
    cfg_path = other / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for f in os.listdir(other):
        if f.startswith("chat_template"):
            os.remove(other / f)
    llm = LLM(str(other), max_model_len=64)
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)
    out = llm.chat(
        [{"role": "user", "content": "Hi"}],
        chat_template="{{ messages[0]['content'] }}",
        use_tqdm=False,
    )
    assert out[0].prompt == "Hi"


def test_no_recompilation_after_warmup(path):
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=80,
        max_num_batched_tokens=32,
        num_gpu_blocks_override=10,
        block_size=8,
        warmup=True,
    )
    runner = llm.llm_engine.runner
    assert runner.num_compiled() >= len(runner.token_buckets)
    compiled = backend_compile_count()
    assert compiled > 0  # the counter sees compilations
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok("Once upon a time").input_ids * k} for k in (1, 2, 3)] + [
        "JAX",
        "The quick brown fox jumps",
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=1, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, stop=["zzz"], ignore_eos=True),
        SamplingParams(temperature=0.5, top_k=5, max_tokens=20, ignore_eos=True),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
    assert llm.llm_engine.scheduler.num_preemptions > 0  # the workload really preempted
    assert backend_compile_count() == compiled  # zero XLA compilations while serving


# -- vLLM's constructor names and methods ---------------------------------------------------


@pytest.fixture(scope="module")
def vllm_llm(path, tmp_path_factory):
    gen = tmp_path_factory.mktemp("gen")
    (gen / "generation_config.json").write_text(
        json.dumps({"temperature": 0.5, "top_k": 7, "max_new_tokens": 5, "eos_token_id": 2})
    )
    return LLM(
        path,
        dtype="float32",
        max_num_batched_tokens=128,
        trust_remote_code=True,
        enforce_eager=True,
        warmup=True,
        generation_config=str(gen),
        hf_overrides={"max_position_embeddings": 96},
        max_logprobs=2,
        kv_cache_dtype="auto",
        enable_chunked_prefill=True,
        load_format="safetensors",
    )


def test_vllm_constructor_names(vllm_llm, llm):
    engine = vllm_llm.llm_engine
    # hf_overrides reached the HF config the engine was built from (the checkpoint says 512)
    assert engine.hf_config.max_position_embeddings == 96 and engine.max_model_len == 96
    assert llm.llm_engine.hf_config.max_position_embeddings == 512
    assert engine.config.warmup is False  # enforce_eager: no warmup
    d = vllm_llm.get_default_sampling_params()
    assert (d.temperature, d.top_k, d.max_tokens) == (0.5, 7, 5)
    assert d.top_p == SamplingParams().top_p  # not in the file: vLLM's default
    assert llm.get_default_sampling_params() == SamplingParams()  # no sampling keys there


def test_max_logprobs_caps_requests(vllm_llm):
    ok = SamplingParams(temperature=0, max_tokens=2, logprobs=2)
    out = vllm_llm.generate("Hello", ok, use_tqdm=False)[0].outputs[0]
    assert [len(e) >= 2 for e in out.logprobs] == [True, True]
    with pytest.raises(ValueError, match="max_logprobs"):
        vllm_llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=3), use_tqdm=False)


def test_reset_prefix_cache(llm):
    prompt = {"prompt_token_ids": list(range(3, 3 + 40))}  # more than two 16-token pages
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 32  # its full pages came from the prefix cache
    assert llm.reset_prefix_cache() is True
    fresh = llm.generate(prompt, params, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0
    assert fresh.outputs[0].token_ids == first.outputs[0].token_ids
