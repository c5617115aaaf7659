"""Multi-host on jax.distributed, faked on one machine: 2 processes x 2 CPU devices on
127.0.0.1 run one TP-4 model; the leader schedules and publishes each step, the follower
(`jaxmm serve` with process id 1) runs it; the tokens are those of a single process."""

import json
import os
import socket
import subprocess
import sys
import time

from tests.helpers import make_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
PROMPTS = ["Hello, my name is", "The quick brown fox jumps"]
ENGINE = ["--dtype", "float32", "--max-model-len", "64", "--max-num-batched-tokens", "64"]

LEADER = r"""
import json, sys
import jax
from jaxmm import LLM, SamplingParams
path, addr = sys.argv[1], sys.argv[2]
llm = LLM(path, dtype="float32", max_model_len=64, max_num_batched_tokens=64,
          tensor_parallel_size=4, coordinator_address=addr, num_processes=2, process_id=0,
          distributed_timeout_s=int(sys.argv[3]))
assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
pages = llm.llm_engine.runner.kv_caches[0]
assert len(pages.sharding.device_set) == 4  # the KV heads span both processes
res = llm.generate(json.loads(sys.argv[4]),
                   __import__("jaxmm").SamplingParams(temperature=0, max_tokens=6,
                                                      ignore_eos=True), use_tqdm=False)
print(json.dumps([o.outputs[0].token_ids for o in res]), flush=True)
llm.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # the suite's own XLA flags (conftest.py) kept, two faked devices added
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        env=_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process (killing what is left at the deadline); (rc, out, err) each."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def test_tp4_over_two_processes_gives_the_tokens_of_one(ckpt_root):
    from jaxmm import LLM, SamplingParams

    path = make_checkpoint(ckpt_root, "llama")
    want = LLM(path, dtype="float32", max_model_len=64, max_num_batched_tokens=64).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    addr = f"127.0.0.1:{_free_port()}"
    follower = _popen(
        ["-m", "jaxmm", "serve", path, "-tp", "4", "--no-warmup", *ENGINE,
         "--coordinator-address", addr, "--num-processes", "2", "--process-id", "1"]
    )  # fmt: skip
    leader = _popen(["-c", LEADER, path, addr, "120", json.dumps(PROMPTS)])
    (rc0, out0, err0), (rc1, _, err1) = _finish([leader, follower], timeout=420)
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]  # the follower left its loop when the leader stopped
    got = json.loads(out0.strip().splitlines()[-1])
    assert got == [o.outputs[0].token_ids for o in want]


def test_a_missing_host_is_a_clear_error(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")
    addr = f"127.0.0.1:{_free_port()}"
    leader = _popen(["-c", LEADER, path, addr, "5", json.dumps(PROMPTS)])
    ((rc, _, err),) = _finish([leader], timeout=180)
    assert rc != 0
    assert "not every one of 2 processes joined 127.0.0.1:" in err
    assert "is a host missing or unreachable?" in err


def test_jaxmm_serve_leads_and_a_follower_runs_its_steps(ckpt_root):
    """`jaxmm serve` as process 0 (HTTP, the scheduler) and as process 1 (steps only); the
    openai client gets one process's text; Ctrl-C on the leader ends both cleanly."""
    import signal

    import httpx
    import openai

    from jaxmm import LLM, SamplingParams

    path = make_checkpoint(ckpt_root, "llama")
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(path, dtype="float32", max_model_len=64, max_num_batched_tokens=64).generate(
        PROMPTS, sp, use_tqdm=False
    )
    addr, port = f"127.0.0.1:{_free_port()}", _free_port()
    dist = ["--coordinator-address", addr, "--num-processes", "2"]
    common = ["-m", "jaxmm", "serve", path, "-tp", "4", "--no-warmup", *ENGINE, *dist]
    follower = _popen([*common, "--process-id", "1"])
    leader = _popen([*common, "--process-id", "0", "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert leader.poll() is None and follower.poll() is None, "a process exited early"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the leader did not become healthy"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for prompt, w in zip(PROMPTS, want):
            r = client.completions.create(
                model=model, prompt=prompt, max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert r.choices[0].text == w.outputs[0].text
        leader.send_signal(signal.SIGINT)
    finally:
        (rc0, _, err0), (rc1, _, err1) = _finish([leader, follower], timeout=120)
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]
