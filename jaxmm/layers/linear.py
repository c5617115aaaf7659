"""Linear and embedding layers, and the partition spec of every parameter.

Column-parallel layers (q/k/v/gate/up, lm_head) shard the output axis over "model";
row-parallel layers (o/down, fc2...) shard the input axis; embeddings shard the vocabulary.
Specs are given by parameter name (`partition_spec`) so the loader can place each tensor
on the runner's mesh as it reads it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

COLUMN = "column"
ROW = "row"

_ROW_NAMES = ("o_proj", "down_proj", "out_proj", "fc2", "dense_4h_to_h", "proj", "linear_fc2")


def Linear(din: int, dout: int, *, bias: bool = False, dtype=jnp.float32, shard=COLUMN, rngs):
    del shard  # recorded by name, see partition_spec
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nnx.initializers.zeros_init(),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def Embed(num: int, dim: int, *, dtype=jnp.float32, rngs):
    return nnx.Embed(
        num,
        dim,
        dtype=dtype,
        param_dtype=dtype,
        embedding_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def expert_spec(name: str, shape: tuple | None, axis_sizes: dict | None) -> PartitionSpec:
    """Stacked MoE experts, gate/up (E, D, F) and down (E, F, D): E over "model" when it
    divides E (expert parallelism: each device holds whole experts), else F (tensor
    parallelism inside every expert, gate/up column- and down row-parallel)."""
    model = (axis_sizes or {}).get("model", 1)
    if shape is None or shape[0] % model == 0:
        return PartitionSpec("model", None, None)
    if name == "down_proj":
        return PartitionSpec(None, "model", None)
    return PartitionSpec(None, None, "model")


def partition_spec(
    path: tuple, ndim: int, shape: tuple | None = None, axis_sizes: dict | None = None
) -> PartitionSpec:
    """Tensor-parallel placement of one parameter, from its path in the model (and, for
    stacked MoE experts, its shape and the mesh's axis sizes)."""
    name = path[-1]
    owner = str(path[-2]) if len(path) > 1 else ""
    if name == "embedding":
        return PartitionSpec("model", None)
    if owner == "experts" and ndim == 3 and name in ("gate_proj", "up_proj", "down_proj"):
        return expert_spec(name, shape, axis_sizes)
    if owner == "gate" and name == "kernel":
        return PartitionSpec()  # MoE router (D, E): small, every device routes every token
    if name == "kernel" and ndim == 2:
        if owner in _ROW_NAMES:
            return PartitionSpec("model", None)
        return PartitionSpec(None, "model")
    if name == "bias" and ndim == 1 and owner not in _ROW_NAMES:
        return PartitionSpec("model")
    return PartitionSpec()


def fit_spec(spec: PartitionSpec, shape: tuple, axis_sizes: dict[str, int]) -> PartitionSpec:
    """`spec` with the mesh axes dropped where they do not divide the dimension.

    Such a tensor is replicated along that axis instead (e.g. a vocabulary of 50,257 rows at
    tensor-parallel size 2, or a vision tower's odd width): still correct under GSPMD, at
    the cost of memory; attention heads are checked at start-up instead (see
    `jaxmm.layers.attention.replicated_kv_heads`).
    """
    out = []
    for i, axis in enumerate(spec):
        names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
        size = 1
        for n in names:
            size *= axis_sizes.get(n, 1)
        out.append(axis if i < len(shape) and shape[i] % size == 0 else None)
    return PartitionSpec(*out)
