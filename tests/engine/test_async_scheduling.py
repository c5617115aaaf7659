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


def test_constrained_steps_stay_asynchronous(path):
    """Grammar-constrained sequences no longer force synchronous steps: the next step's
    model launches before their tokens reach the host, and its masks are filled once they
    do. Same outputs as synchronous steps, mixed with free sequences, n > 1 and stops."""
    from jaxmm.sampling_params import StructuredOutputsParams as SO

    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
        "required": ["a", "b"],
    }
    prompts = ["Hello, my name is", "JAX", "The quick brown fox", "A B C", "Once upon"]
    params = [
        SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json=schema)),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(
            temperature=0.9,
            seed=5,
            n=2,
            max_tokens=30,
            structured_outputs=SO(choice=["alpha", "beta gamma", "delta"]),
        ),
        SamplingParams(
            temperature=0, max_tokens=30, stop=["9"], structured_outputs=SO(regex=r"[0-9]{2,12}")
        ),
        SamplingParams(
            temperature=0, max_tokens=20, logprobs=1, structured_outputs=SO(json_object=True)
        ),
    ]
    want = _summary(_llm(path, False).generate(prompts, params, use_tqdm=False))
    llm = _llm(path, True)
    engine = llm.llm_engine
    engine.add_request("x", prompts[3], params[3])
    engine.step()  # prefill: its first token is sampled in flight
    engine.step()  # the next step launched without waiting for it
    assert engine._pending is not None
    while engine.has_unfinished_requests():
        engine.step()
    got = _summary(llm.generate(prompts, params, use_tqdm=False))
    for g, w in zip(got, want):
        for gc, wc in zip(g, w):
            assert gc[:4] == wc[:4]
            if wc[4] is not None:
                assert gc[4] == pytest.approx(wc[4], abs=1e-4)
    assert got[2][0][1] in ("alpha", "beta gamma", "delta")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
