"""Stacked MoE expert weights from the layouts HF checkpoints hold.

jaxmm keeps a MoE layer's experts as `experts.gate_proj` / `experts.up_proj`: (E, D, F) and
`experts.down_proj`: (E, F, D) (layers/moe.py says why gate and up stay apart). Checkpoints
come in two layouts, and both load:

- per expert, `...experts.{e}.gate_proj.weight`: (F, D) (and up_proj, down_proj: (D, F)):
  what transformers 5.x `save_pretrained` writes for Qwen2/3-MoE (it reverts its in-memory
  fusion on save) and what the released Qwen3-MoE checkpoints hold. The E tensors of one
  projection are buffered as they stream by and stacked when the last one arrives.
- fused, `...experts.gate_up_proj`: (E, 2F, D) with gate first, and `...experts.down_proj`:
  (E, D, F): transformers 5.x's in-memory layout (`layout="out_in"`). Qwen3-VL-MoE's released
  checkpoints store the transpose, (E, D, 2F) and (E, F, D) (`layout="in_out"`).

`ExpertStacker` is a `convert_hf_tensor`-style hook with state, so the loader makes a fresh
one per load through a model's `hf_tensor_converter()`.
"""

from __future__ import annotations

import re

import numpy as np

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


class ExpertStacker:
    """Turns HF expert tensors into jaxmm's stacked ones; passes every other key through."""

    def __init__(self, num_experts: int, layout: str = "out_in"):
        if layout not in ("out_in", "in_out"):
            raise ValueError(f"expert layout {layout!r}: 'out_in' or 'in_out'")
        self.E = num_experts
        self.layout = layout
        self.pending: dict[tuple[str, str], dict[int, np.ndarray]] = {}

    def __call__(self, key: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        m = _PER_EXPERT.match(key)
        if m:
            prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if e >= self.E:
                return [(key, array)]  # no such expert: the loader reports it as unexpected
            got = self.pending.setdefault((prefix, proj), {})
            got[e] = array  # HF Linear weight (out, in)
            if len(got) < self.E:
                return []
            del self.pending[(prefix, proj)]
            stacked = np.stack([got[i] for i in range(self.E)])  # (E, out, in)
            return [(f"{prefix}.{proj}", stacked.transpose(0, 2, 1))]
        m = _FUSED.match(key)
        if m and array.ndim == 3:
            prefix, proj = m.group(1), m.group(2)
            w = array if self.layout == "in_out" else array.transpose(0, 2, 1)  # (E, in, out)
            if proj == "down_proj":
                return [(f"{prefix}.down_proj", w)]
            F = w.shape[2] // 2
            return [(f"{prefix}.gate_proj", w[:, :, :F]), (f"{prefix}.up_proj", w[:, :, F:])]
        return [(key, array)]

    def incomplete(self) -> list[str]:
        """Stacks still waiting for experts (a checkpoint missing some)."""
        return [f"{p}.{proj} ({len(g)}/{self.E} experts)" for (p, proj), g in self.pending.items()]
