"""Saved programs and the jaxmm disk cache (CPU: programs compiled ahead of time, kept in memory;
the save/load round trip itself runs on GPU/TPU only, see saved_programs.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm import disk_cache
from jaxmm.runner import saved_programs
from jaxmm.runner.saved_programs import SavedPrograms, abstract_signature


@pytest.fixture
def cache(tmp_path):
    """A persistent cache directory for this test only (JAX's setting is process-global)."""
    from jax.experimental.compilation_cache import compilation_cache

    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        yield tmp_path
    finally:  # JAX keeps its cache object once made: drop it, as tests/weights does
        jax.config.update("jax_compilation_cache_dir", old)
        compilation_cache.reset_cache()


def _f(x, y, scale=1.0):
    return x * scale + y.sum(), jnp.argmax(x)


def test_prepared_program_matches_jit_and_compiles_nothing_more():
    jitted = jax.jit(_f, static_argnames=("scale",))
    progs = SavedPrograms("f", jitted, salt="s")
    x, y = jnp.arange(8.0), jnp.ones((3, 3))
    assert progs.prepare("sig", (x, y), {"scale": 2.0}) == "compiled"
    assert len(progs) == 1
    before = jitted._cache_size()
    got = progs("sig", x, y, scale=2.0)
    want = _f(x, y, scale=2.0)
    np.testing.assert_array_equal(got[0], want[0])
    assert int(got[1]) == int(want[1])
    assert jitted._cache_size() == before  # the prepared program ran, not jit
    # an unknown signature goes through jit
    got = progs("other", x, y, scale=3.0)
    np.testing.assert_array_equal(got[0], _f(x, y, scale=3.0)[0])
    assert jitted._cache_size() == before + 1


def test_signature_sees_shapes_dtypes_tree_and_statics():
    x = jnp.zeros((4,), jnp.float32)
    base = abstract_signature((x, [x]), {"a": 1})
    assert base == abstract_signature((jnp.ones((4,), jnp.float32), [x]), {"a": 1})
    assert base != abstract_signature((jnp.zeros((5,), jnp.float32), [x]), {"a": 1})
    assert base != abstract_signature((jnp.zeros((4,), jnp.bfloat16), [x]), {"a": 1})
    assert base != abstract_signature((x, [x, x]), {"a": 1})
    assert base != abstract_signature((x, (x,)), {"a": 1})
    assert base != abstract_signature((x, [x]), {"a": 2})
    assert base != abstract_signature((np.zeros((4,), np.float32), [x]), {"a": 1})


def test_keys_follow_source_flags_and_parts(monkeypatch):
    k = disk_cache.key_of("step", ("cfg", 1))
    assert k == disk_cache.key_of("step", ("cfg", 1))
    assert k != disk_cache.key_of("step", ("cfg", 2))
    monkeypatch.setenv("JAXMM_SOME_KERNEL_FLAG", "1")
    assert k != disk_cache.key_of("step", ("cfg", 1))
    monkeypatch.delenv("JAXMM_SOME_KERNEL_FLAG")
    monkeypatch.setenv("JAXMM_CACHE_DIR", "/elsewhere")  # where the cache lives is not a key
    assert k == disk_cache.key_of("step", ("cfg", 1))
    monkeypatch.setattr(disk_cache, "source_digest", lambda: "edited")
    assert k != disk_cache.key_of("step", ("cfg", 1))


def test_disk_entries_are_atomic_and_need_a_cache_dir(cache):
    assert disk_cache.read("probe", "k") is None
    disk_cache.write("probe", "k", b"ok")
    assert disk_cache.read("probe", "k") == b"ok"
    assert not [n for n in os.listdir(cache / "jaxmm") if n.startswith(".tmp-")]
    disk_cache.forget("probe", "k")
    assert disk_cache.read("probe", "k") is None
    jax.config.update("jax_compilation_cache_dir", None)
    assert disk_cache.cache_dir() is None
    disk_cache.write("probe", "k", b"ok")  # no directory: nothing written, no error
    assert disk_cache.read("probe", "k") is None


def test_cpu_programs_are_not_saved(cache):
    progs = SavedPrograms("f", jax.jit(_f), salt="s")
    progs.prepare("sig", (jnp.arange(4.0), jnp.ones(2)))
    assert not list(cache.glob("jaxmm/program-*"))


def test_unusable_saved_program_is_dropped_and_rebuilt(cache, monkeypatch):
    monkeypatch.setattr(saved_programs, "saving_supported", lambda: True)
    monkeypatch.setattr(saved_programs.SavedPrograms, "_save", lambda self, key, program: None)
    jitted = jax.jit(_f)
    progs = SavedPrograms("f", jitted, salt="s")
    args = (jnp.arange(4.0), jnp.ones(2))
    key = disk_cache.key_of("f", "s", abstract_signature(args, {}))
    disk_cache.write("program", key, b"not a pickled program")
    assert progs.prepare("sig", args) == "compiled"
    assert disk_cache.read("program", key) is None  # the torn entry is gone
    np.testing.assert_array_equal(progs("sig", *args)[0], _f(*args)[0])


def test_probe_verdict_is_kept(cache, monkeypatch):
    from jaxmm.kernels import backends

    calls = []

    def probe(kind):
        calls.append(kind)
        return True

    monkeypatch.setattr(backends, "probe", probe)
    backends.pallas_works.cache_clear()
    try:
        assert backends.pallas_works("gpu") and backends.pallas_works("gpu")
        backends.pallas_works.cache_clear()  # a new process
        assert backends.pallas_works("gpu")
        assert calls == ["gpu"]
    finally:
        backends.pallas_works.cache_clear()


def test_engine_with_saved_programs_matches_lazy_engine(ckpt_root, cache):
    from jaxmm import LLM, SamplingParams
    from jaxmm.runner.model_runner import backend_compile_count
    from tests.helpers import make_checkpoint

    path = make_checkpoint(str(ckpt_root), "llama")
    kw = dict(max_num_batched_tokens=64, max_model_len=128, compilation_cache_dir=str(cache))
    prompts = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": list(range(1, 40))}]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    lazy = LLM(path, **kw)
    want = [lazy.generate(prompts, sp, use_tqdm=False) for sp in (greedy, sampled)]
    warm = LLM(path, warmup=True, **kw)
    runner = warm.llm_engine.runner
    assert len(runner.step_programs) == len(runner.token_buckets)
    c0 = backend_compile_count()
    got = [warm.generate(prompts, sp, use_tqdm=False) for sp in (greedy, sampled)]
    assert backend_compile_count() == c0
    for g, w in zip(got, want):
        assert [o.outputs[0].token_ids for o in g] == [o.outputs[0].token_ids for o in w]
