"""Checkpoint loading: sharded safetensors, missing/unexpected keys, the compilation cache."""

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxmm import LLM, SamplingParams
from tests.helpers import make_checkpoint

SP = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def path(ckpt_root):
    return make_checkpoint(ckpt_root, "llama")


def _copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))


def test_sharded_checkpoint_with_index(path, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    _copy_without_weights(path, sharded)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    a = LLM(path, dtype="float32", max_model_len=64).generate("Hello", SP, use_tqdm=False)
    b = LLM(str(sharded), dtype="float32", max_model_len=64).generate("Hello", SP, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_missing_and_unexpected_keys_are_listed(path, tmp_path):
    broken = tmp_path / "broken"
    _copy_without_weights(path, broken)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError) as e:
        LLM(str(broken), max_model_len=64)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.kernel" in msg and "model.layers.9.extra.weight" in msg


def test_wrong_shape_is_named(path, tmp_path):
    broken = tmp_path / "shape"
    _copy_without_weights(path, broken)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(7,\)"):
        LLM(str(broken), max_model_len=64)


def test_persistent_compilation_cache(path, tmp_path):
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    cache = tmp_path / "xla-cache"
    try:
        llm = LLM(path, dtype="float32", max_model_len=64, compilation_cache_dir=str(cache))
        llm.generate("Hello", SP, use_tqdm=False)
        assert cache.exists() and any(cache.iterdir())
    finally:  # the cache is process-wide: leave it off for the other tests
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
