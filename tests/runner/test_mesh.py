"""Scale-out from day one: the same tokens on a faked 2-device host with tensor parallelism."""

import json
import os
import subprocess
import sys

from tests.helpers import make_checkpoint

SCRIPT = r"""
import json, sys
from jaxmm import LLM, SamplingParams
import jax
assert len(jax.devices()) == 2, jax.devices()
outs = {}
for tp in (1, 2):
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=64, tensor_parallel_size=tp)
    if tp == 2:
        kv = llm.llm_engine.runner.kv_caches[0]
        assert len(kv.sharding.device_set) == 2  # KV pages split over KV heads
    res = llm.generate(["Hello, my name is", "The quick brown fox"],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    outs[tp] = [o.outputs[0].token_ids for o in res]
print(json.dumps(outs))
"""


def test_tensor_parallel_two_fake_devices(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outs["1"] == outs["2"]
