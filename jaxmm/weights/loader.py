"""Fill a model's parameters from HF-named tensors, placing each on the mesh as it is read.

The map from HF keys to parameter paths is declarative: `a.b.3.c.weight` goes to the
parameter at path (a, b, 3, c, kernel) transposed (a Linear), (..., embedding) (an Embed)
or (..., weight) (a norm). A model may add `hf_key_rules`: (regex, replacement) pairs
applied to keys first, `ignored_hf_keys` (regexes dropped silently) and a
`convert_hf_tensor(key, array) -> [(key, array)]` hook for fused tensors.
The loader asserts that every parameter is filled exactly once with the right shape.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxmm import progress
from jaxmm.layers.linear import fit_spec, partition_spec


def _path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _candidates(path: tuple):
    """Parameter paths an HF key may land on, with whether to transpose."""
    if path[-1] == "weight":
        base = path[:-1]
        yield base + ("kernel",), True
        yield base + ("embedding",), False
        yield path, False
    else:
        yield path, False


def load_params(
    model_cls_or_obj,
    abstract_state: nnx.State,
    tensors: Iterable[tuple[str, np.ndarray]],
    mesh: Mesh,
    dtype,
) -> nnx.State:
    """Returns an nnx.State of device arrays for `nnx.merge(graphdef, state)`."""
    flat = dict(nnx.to_flat_state(abstract_state))
    ignored = [re.compile(p) for p in getattr(model_cls_or_obj, "ignored_hf_keys", ())]
    rules = [(re.compile(p), r) for p, r in getattr(model_cls_or_obj, "hf_key_rules", ())]
    convert = getattr(model_cls_or_obj, "convert_hf_tensor", None)
    make_convert = getattr(model_cls_or_obj, "hf_tensor_converter", None)
    if make_convert is not None:  # a hook with state (stacking MoE experts): fresh per load
        convert = make_convert()
    tied = bool(getattr(model_cls_or_obj, "tie_word_embeddings", False))
    filled: dict[tuple, jax.Array] = {}
    unexpected: list[str] = []
    bar = progress.bar(total=len(flat), desc="Loading weights", unit="tensor")

    def place(key: str, array: np.ndarray) -> None:
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        if any(p.search(key) for p in ignored) or (tied and key == "lm_head.weight"):
            return
        for path, transpose in _candidates(_path(key)):
            if path not in flat:
                continue
            var = flat[path]
            want = var.get_value().shape
            arr = array.T if transpose and array.ndim == 2 else array
            if tuple(arr.shape) != tuple(want):
                raise ValueError(
                    f"weight {key!r}: shape {tuple(array.shape)} does not fit parameter "
                    f"{'.'.join(map(str, path))} of shape {tuple(want)}"
                )
            if path in filled:
                raise ValueError(f"parameter {'.'.join(map(str, path))} filled twice ({key!r})")
            target = var.get_value().dtype
            host = np.ascontiguousarray(np.asarray(arr).astype(target))
            spec = fit_spec(
                partition_spec(path, host.ndim, host.shape, mesh.shape), host.shape, mesh.shape
            )
            sharding = NamedSharding(mesh, spec)
            filled[path] = jax.device_put(host, sharding)
            bar.update()
            return
        unexpected.append(key)

    with bar:
        for key, array in tensors:
            pieces = convert(key, array) if convert is not None else [(key, array)]
            for k, a in pieces:
                place(k, a)

    missing = [".".join(map(str, p)) for p in flat if p not in filled]
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model: "
            f"missing parameters {missing[:20]}{' ...' if len(missing) > 20 else ''} "
            f"({len(missing)}); unexpected weights {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    del dtype
    return nnx.from_flat_state([(p, flat[p].replace(filled[p])) for p in flat])


@functools.cache
def _random_maker(shape, dtype, ones: bool, sharding, scale: float):
    """One small program per distinct (shape, dtype, sharding), reused by equal tensors."""

    def make(key):
        if ones:
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)

    return jax.jit(make, out_shardings=sharding)


def random_params(abstract_state: nnx.State, mesh: Mesh, seed: int = 0, scale: float = 0.02):
    """Random weights with the model's shapes, made on device in place (load_format="dummy").

    Norm weights are ones; everything else is N(0, scale). For benchmarks: no file I/O.
    Tensors of one shape share a compiled program (a handful of compilations for a whole
    model; one program for all tensors compiles for minutes on a GPU).
    """
    flat = list(nnx.to_flat_state(abstract_state))
    out = []
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(flat):
        sd = var.get_value()
        spec = fit_spec(
            partition_spec(path, len(sd.shape), tuple(sd.shape), mesh.shape),
            tuple(sd.shape),
            mesh.shape,
        )
        sharding = NamedSharding(mesh, spec)
        is_norm = path[-1] == "weight" and len(sd.shape) == 1
        make = _random_maker(tuple(sd.shape), jnp.dtype(sd.dtype), is_norm, sharding, scale)
        out.append((path, var.replace(make(jax.random.fold_in(key, i)))))
    return nnx.from_flat_state(out)


def cast_dtype(name: str, hf_config) -> jnp.dtype:
    if name == "auto":
        # `torch_dtype` is the name before transformers 4.56; read it from the instance's own
        # attributes: later versions warn on every read of the property
        own = getattr(hf_config, "__dict__", {})
        torch_dtype = getattr(hf_config, "dtype", None) or own.get("torch_dtype")
        name = str(torch_dtype).replace("torch.", "") if torch_dtype else "float32"
        if name not in ("bfloat16", "float16", "float32"):
            name = "float32"
        if jax.default_backend() == "cpu" and name != "float32":
            # CPUs have no fast half-precision matmuls; float32 is both faster and exact
            name = "float32"
    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[name]
