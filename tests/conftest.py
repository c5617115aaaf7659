import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Pallas' GPU interpreter runs a CTA's warpgroups as threads, each an XLA:CPU program whose
# barrier waits block inside host callbacks. XLA's concurrency-seeking scheduler lets such a
# program hand its callbacks to the CPU client's small thread pool (2 threads on a 2-core
# machine), where blocked waits can starve the warpgroup they wait for (a deadlock seen with
# a variant of the Mosaic prefill kernel). Schedule for memory instead; set before jax loads.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpts"))
