"""Asynchronous scheduling (step N+1 launched before step N's tokens are read) changes
nothing a user sees: the same tokens, texts, logprobs and finish reasons as synchronous
steps, for a workload with every kind of stop, penalties, n > 1, preemption and aborts."""

import pytest

from jaxmm import LLM, SamplingParams
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def path(ckpt_root):
    return make_checkpoint(ckpt_root, "llama")


def _llm(path, async_scheduling, **kw):
    return LLM(
        path,
        dtype="float32",
        max_model_len=96,
        max_num_batched_tokens=32,
        block_size=8,
        async_scheduling=async_scheduling,
        **kw,
    )


def _workload(tok):
    prompts = [
        "Hello, my name is",
        {"prompt_token_ids": tok("Once upon a time").input_ids * 3},
        "The quick brown fox jumps",
        "JAX",
        "A B C D E F",
        "Hello, my name is",  # a prefix-cache hit
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop=[" the", "e"], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=25, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=9, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]
    return prompts, params


def _summary(outs):
    return [
        [
            (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.cumulative_logprob)
            for c in o.outputs
        ]
        for o in outs
    ]


def test_async_equals_sync(path):
    sync = _llm(path, False)
    tok = sync.get_tokenizer()
    prompts, params = _workload(tok)
    want = _summary(sync.generate(prompts, params, use_tqdm=False))
    for kw in ({}, {"num_gpu_blocks_override": 14}):  # the second run must preempt
        llm = _llm(path, True, **kw)
        got = _summary(llm.generate(prompts, params, use_tqdm=False))
        for g, w in zip(got, want):
            for gc, wc in zip(g, w):
                assert gc[:4] == wc[:4]
                if wc[4] is not None:
                    assert gc[4] == pytest.approx(wc[4], abs=1e-4)
        engine = llm.llm_engine
        assert not engine.has_unfinished_requests() and engine._pending is None
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        if kw:
            assert engine.scheduler.num_preemptions > 0


def test_overlap_and_abort_in_flight(path):
    llm = _llm(path, True)
    engine = llm.llm_engine
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, p)
    engine.add_request("b", {"prompt_token_ids": [4, 5, 6, 7]}, p)
    assert engine.step() == []  # the first step's tokens are still in flight
    assert engine._pending is not None
    seen = {}
    for _ in range(4):
        for out in engine.step():
            seen[out.request_id] = len(out.outputs[0].token_ids)
    assert seen == {"a": 4, "b": 4}  # one token per step, one step behind
    engine.abort_request("a")  # while its next token is in flight
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "b"
            done = out
    assert done.finished and len(done.outputs[0].token_ids) == 40
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
