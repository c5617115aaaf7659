"""Data parallelism: replicas in engine processes of their own on disjoint faked devices give
the tokens of one engine, offline and through the server; the balancer's choices."""

import json
import os
import subprocess
import sys

from jaxmm.engine.data_parallel import PREFIX_SLACK_TOKENS, Balancer, replica_env
from tests.helpers import make_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_balancer_takes_the_least_loaded_replica_and_releases_work():
    b = Balancer(3)
    assert [b.pick(f"r{i}", [1, 2, 3], 10) for i in range(3)] == [0, 1, 2]
    b.pick("big", [5] * 8, 100)  # replica 0 now holds 13 + 108 tokens
    assert b.pick("next", [9], 1) == 1
    b.release("big")
    b.release("big")  # twice is harmless
    assert b.work == [13, 15, 13]
    assert b.pick("after", [9], 1) == 0


def test_balancer_sends_a_known_prefix_to_its_replica_unless_it_is_far_busier():
    b = Balancer(2)
    system = list(range(32))  # two whole pages shared by the prompts below
    assert b.pick("a", system + [100], 4) == 0
    assert b.pick("b", [7] * 40, 4) == 1  # another prefix: the idle replica
    assert b.pick("c", system + [101, 102], 4) == 0  # the prefix cache is on replica 0
    b.pick("huge", system + [103], PREFIX_SLACK_TOKENS)
    assert b.pick("d", system + [104], 4) == 1  # replica 0 is too busy now
    assert b.pick("short", [1, 2], 4) == 1  # under one page: least work only


def test_replica_env_splits_gpus_or_device_offsets():
    gpus = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert replica_env(1, 2, 2, gpus) == {"CUDA_VISIBLE_DEVICES": "2,3", "JAXMM_FIRST_DEVICE": "0"}
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert replica_env(1, 2, 2, cpu) == {"JAXMM_FIRST_DEVICE": "2"}
    try:
        replica_env(0, 2, 3, gpus)
    except ValueError as e:
        assert "needs 6 GPUs; 4 are visible" in str(e)
    else:
        raise AssertionError("6 devices out of 4 accepted")


SCRIPT = r"""
import json, os, sys, concurrent.futures
import httpx, openai
from jaxmm import LLM, SamplingParams
from jaxmm.server.app import build_app
from tests.server.util import core_state, running_server

path = sys.argv[1]
prompts = ["Hello, my name is", "The quick brown fox", "Once upon a time", "In a galaxy far"]
sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
kw = dict(dtype="float32", max_model_len=64, max_num_batched_tokens=64, tensor_parallel_size=2)
base_llm = LLM(path, **kw)
base = base_llm.generate(prompts, sp, use_tqdm=False)
base_chat = base_llm.chat([{"role": "user", "content": "Hi there"}], sp, use_tqdm=False)
llm = LLM(path, data_parallel_size=2, **kw)
got = llm.generate(prompts, sp, use_tqdm=False)
assert llm.reset_prefix_cache()
dp_chat = llm.chat([{"role": "user", "content": "Hi there"}], sp, use_tqdm=False)
offline_finished = [s["stats"]["finished"] for s in llm.dp_engine.call(core_state)]
app = build_app(llm.dp_engine, served_model_names=["m"], api_keys="k")
with running_server(app) as url:
    oai = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=300)

    def complete(p):
        r = oai.completions.create(model="m", prompt=p, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        served = list(pool.map(complete, prompts))
    metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"}).text
states = llm.dp_engine.call(core_state)
pids = llm.dp_engine.pids
llm.shutdown()
alive = []
for pid in pids:
    try:
        os.kill(pid, 0)
        alive.append(pid)
    except ProcessLookupError:
        pass
print(json.dumps({
    "base": [o.outputs[0].token_ids for o in base],
    "base_text": [o.outputs[0].text for o in base],
    "dp": [o.outputs[0].token_ids for o in got],
    "chat": [base_chat[0].outputs[0].token_ids, dp_chat[0].outputs[0].token_ids],
    "served": served,
    "offline_finished": offline_finished,
    "finished": [s["stats"]["finished"] for s in states],
    "unfinished": [s["unfinished"] for s in states],
    "metrics": [l for l in metrics.splitlines() if l.startswith("jaxmm_num_requests_running")],
    "alive": alive,
}))
"""


def test_dp2_on_four_fake_devices_gives_the_tokens_of_one_engine(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(len(t) == 6 for t in got["base"])
    assert got["dp"] == got["base"]  # offline, request by request
    assert got["chat"][1] == got["chat"][0] and len(got["chat"][0]) == 6
    assert got["served"] == got["base_text"]  # through the server
    # both replicas served: 4 requests offline, a chat, then 4 more through the server
    assert sorted(got["offline_finished"]) == [2, 3] and sum(got["finished"]) == 9
    assert min(got["finished"]) >= 2
    assert got["unfinished"] == [False, False]
    assert sorted(got["metrics"]) == [
        'jaxmm_num_requests_running{engine="0"} 0.0',
        'jaxmm_num_requests_running{engine="1"} 0.0',
    ]
    assert got["alive"] == []  # every replica process is gone
