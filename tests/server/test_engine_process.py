"""The engine core in a process of its own (ProcessEngine): the delta wire format, failures
of the core (a dead process, a failed step), and `jaxmm serve` starting and stopping it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from jaxmm import LLM, SamplingParams
from jaxmm.engine.async_engine import EngineDeadError, EngineError
from jaxmm.engine.core_process import (
    DeltaEncoder,
    ProcessEngine,
    _coalesce,
    _Live,
    merge_deltas,
)
from jaxmm.llm import engine_config
from jaxmm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxmm.server.app import build_app
from tests.helpers import make_checkpoint
from tests.server.util import CoreProbe, running_server

KEY = "sk-test"
ENGINE_KW = dict(
    max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 22
)


# -- the wire format ---------------------------------------------------------------------------


def _history(rng: random.Random, n_comp: int, steps: int) -> list[RequestOutput]:
    """A request's cumulative outputs over `steps` steps: text grows, sometimes shrinks
    (a stop string cut off), tokens and logprobs grow; the last one is finished."""
    texts = ["" for _ in range(n_comp)]
    ids: list[list[int]] = [[] for _ in range(n_comp)]
    outs = []
    for step in range(steps):
        last = step == steps - 1
        comps = []
        for i in range(n_comp):
            for _ in range(rng.randint(0, 2)):
                ids[i].append(rng.randrange(1000))
            texts[i] += "".join(rng.choice("abcé ") for _ in range(rng.randint(0, 3)))
            if rng.random() < 0.15:
                texts[i] = texts[i][: rng.randint(0, len(texts[i]))]
            comps.append(
                CompletionOutput(
                    i,
                    texts[i],
                    list(ids[i]),
                    -float(len(ids[i])),
                    [{t: Logprob(-0.5, 1, str(t))} for t in ids[i]],
                    "stop" if last else None,
                    None,
                )
            )
        outs.append(RequestOutput("r", None, [1, 2], comps, last, metrics={"step": step}))
    return outs


@pytest.mark.parametrize("seed", range(20))
def test_deltas_rebuild_the_cumulative_outputs(seed):
    rng = random.Random(seed)
    history = _history(rng, rng.randint(1, 3), rng.randint(1, 12))
    enc = DeltaEncoder()
    msgs = [("out", [enc.encode(o)], {"step": i}) for i, o in enumerate(history)]
    # the sender and the reader may fold any run of consecutive messages into one
    groups, i = [], 0
    while i < len(msgs):
        k = rng.randint(1, 4)
        groups.append(_coalesce(msgs[i : i + k]))
        i += k
    live = _Live(None, None, None, [1, 2], None)
    got = None
    for group in groups:
        assert len(group) == 1
        (_, deltas, stats) = group[0]
        got = live.apply(deltas[0])
    want = history[-1]
    assert got.finished and stats == {"step": len(history) - 1}
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert (g.text, g.token_ids, g.logprobs) == (w.text, w.token_ids, w.logprobs)
        assert (g.cumulative_logprob, g.finish_reason) == (w.cumulative_logprob, w.finish_reason)
    assert got.metrics == want.metrics
    assert enc._sent == {}  # a finished request leaves nothing behind


def test_merge_keeps_other_requests_and_order():
    enc = DeltaEncoder()
    a = _history(random.Random(1), 1, 3)
    b = [
        RequestOutput("s", None, [3], o.outputs, o.finished)
        for o in _history(random.Random(2), 1, 2)
    ]
    first = [enc.encode(a[0]), enc.encode(b[0])]
    second = [enc.encode(a[1])]
    merged = merge_deltas(first, second)
    assert [d[0] for d in merged] == ["r", "s"]
    # a message of another kind is never folded across
    msgs = [("out", first, {}), ("ack", "x", None), ("out", second, {}), ("stats", {"n": 1})]
    kinds = [m[0] for m in _coalesce(msgs)]
    assert kinds == ["out", "ack", "out"] and _coalesce(msgs)[-1][2] == {"n": 1}


# -- a live core -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    return make_checkpoint(ckpt_root, "llama")


def _run(client, rid: str, prompt: str, params: SamplingParams) -> RequestOutput:
    async def go():
        last = None
        async for out in client.generate(rid, prompt, params):
            last = out
        return last

    return asyncio.run(go())


def _fail_next_step(engine) -> None:
    """Run in the core: make its next step raise."""

    def boom():
        raise RuntimeError("injected failure")

    engine.step = boom


def _restore_step(engine) -> None:
    del engine.step


def test_process_engine_matches_offline_and_survives_a_failed_step(ckpt):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2, stop=["ab"])
    want = LLM(ckpt, **ENGINE_KW).generate(["Hello, my name is"], params, use_tqdm=False)[0]
    client = ProcessEngine(engine_config(model=ckpt, **ENGINE_KW))
    try:
        assert client.max_model_len == 128 and client.is_running
        got = _run(client, "a", "Hello, my name is", params)
        g, w = got.outputs[0], want.outputs[0]
        assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason)
        assert g.logprobs == w.logprobs and got.prompt_token_ids == want.prompt_token_ids

        # bad input comes back to its request, with its type and text
        with pytest.raises(ValueError, match="maximum context length"):
            _run(client, "b", "Hello " * 200, params)
        with pytest.raises(ValueError, match="reach this engine as PendingPrompt"):
            asyncio.run(client.add_request("c", "hi", params, mm=object()))

        # a step that raises fails the requests in flight, and only those
        client.call(_fail_next_step)
        with pytest.raises(EngineError):
            _run(client, "d", "Hello", params)
        client.call(_restore_step)
        assert _run(client, "e", "Hello, my name is", params).outputs[0].text == w.text
        probe = CoreProbe(client)
        assert not probe.has_unfinished_requests()
        assert probe.block_manager.num_free_blocks == probe.block_manager.num_blocks
        assert client.get_stats()["finished"] >= 2
    finally:
        client.shutdown()
    assert not client.is_running and client._proc.exitcode is not None


def test_a_dead_core_fails_requests_cleanly(ckpt):
    client = ProcessEngine(engine_config(model=ckpt, **ENGINE_KW))
    app = build_app(client, served_model_names=["m"], api_keys=KEY)
    try:
        with running_server(app) as url:
            oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            assert oai.completions.create(model="m", prompt="Hello", max_tokens=2).choices
            os.kill(client.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while client.is_running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert httpx.get(url + "/health").status_code == 503
            with pytest.raises(openai.APIStatusError) as e:
                oai.completions.create(model="m", prompt="Hello", max_tokens=2)
            assert e.value.status_code == 503 and "not running" in e.value.message
        with pytest.raises(EngineDeadError):
            asyncio.run(client.add_request("x", "hi", SamplingParams()))
    finally:
        client.shutdown()


def test_a_core_that_cannot_start_says_why(ckpt):
    config = engine_config(model=ckpt, **ENGINE_KW)
    # ModelConfig refuses an unknown backend itself; past that check the core fails at start
    object.__setattr__(config.model, "attention_backend", "nonsense")
    with pytest.raises(RuntimeError, match="failed to start: .*attention"):
        ProcessEngine(config)


# -- jaxmm serve -------------------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out.update(int(x) for x in f.read().split())
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads child processes from /proc")
def test_serve_runs_the_core_in_a_process_and_stops_it(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jaxmm", "serve", ckpt, "--port", str(port), "--api-key", KEY]
    cmd += ["--max-model-len", "128", "--max-num-seqs", "8", "--kv-cache-memory-bytes", "4M"]
    cmd += ["--no-warmup", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        children = _children(proc.pid)
        assert children, "the engine core should run in a child process"
        oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = oai.chat.completions.create(
            model=ckpt,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=4,
            temperature=0,
        )
        assert r.usage.completion_tokens == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in children), "the engine process outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
