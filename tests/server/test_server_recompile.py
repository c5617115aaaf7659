"""The no-recompile guard on the server path: after warmup, a burst of concurrent streamed
requests with the parameters clients send (greedy, temperature, top-k / top-p / min-p,
greedy with a top_p, logprobs with and without top_logprobs, n > 1, stop strings, chat and
completions, prompts of several lengths) compiles nothing in the engine process. The XLA
compile counter is read inside the core, through ProcessEngine.call.

Penalties (presence / frequency / repetition) are left out: their tensors grow with the
sequence, so their sampler variants compile on first use by design (model_runner.dispatch).
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.helpers import make_checkpoint
from tests.server.live_util import KEY, NAME, live_server

ENGINE_KW = dict(
    max_model_len=96,
    max_num_seqs=16,
    max_num_batched_tokens=64,
    kv_cache_memory_bytes=1 << 22,
    warmup=True,
)


def core_compiles(engine) -> int:
    """Run in the engine process: XLA compilations there so far."""
    from jaxmm.runner.model_runner import backend_compile_count

    return backend_compile_count()


@pytest.fixture(scope="module")
def live(ckpt_root):
    with live_server(make_checkpoint(ckpt_root, "llama"), **ENGINE_KW) as x:
        yield x


CHAT = [
    dict(temperature=0),
    dict(temperature=0.8, seed=1),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.7, extra_body={"top_k": 5, "min_p": 0.05}),
    dict(temperature=0, top_p=0.5),  # greedy: the filters do not apply
    dict(temperature=0.9, logprobs=True, top_logprobs=3),
    dict(temperature=0, logprobs=True),
    dict(temperature=0.8, n=2, seed=3),
    dict(temperature=0, stop=["e"]),
    dict(),  # the server's defaults
]
COMPLETIONS = [
    dict(temperature=0, logprobs=2),
    dict(temperature=0.6, top_p=0.8),
    dict(temperature=1.0, echo=False, extra_body={"top_k": 3}),
]


async def burst(url: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

    async def chat(i: int, kw: dict) -> str:
        words = " ".join(["word"] * (1 + i))  # 11 to 56 tokens: every token bucket
        stream = await client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": f"{i}: {words}"}],
            max_tokens=6 + i % 4,
            stream=True,
            **kw,
        )
        finish = None
        async for chunk in stream:
            for c in chunk.choices:
                finish = c.finish_reason or finish
        return finish

    async def complete(i: int, kw: dict) -> str:
        stream = await client.completions.create(
            model=NAME, prompt="abc " * (2 + 5 * i), max_tokens=5, stream=True, **kw
        )
        finish = None
        async for chunk in stream:
            for c in chunk.choices:
                finish = c.finish_reason or finish
        return finish

    try:
        return await asyncio.gather(
            *[chat(i, kw) for i, kw in enumerate(CHAT)],
            *[complete(i, kw) for i, kw in enumerate(COMPLETIONS)],
        )
    finally:
        await client.close()


def test_a_burst_of_streams_compiles_nothing(live):
    engine, url = live
    client = engine.client  # the ProcessEngine behind the server
    before = client.call(core_compiles, timeout=60)
    assert before > 0  # the counter sees warmup's compilations
    for _ in range(2):  # the first burst, then one that finds every cache warm
        finishes = asyncio.run(burst(url))
        assert all(f in ("stop", "length") for f in finishes), finishes
    assert client.call(core_compiles, timeout=60) == before
