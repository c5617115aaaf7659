"""Pooling: how a pooling (embedding) model turns hidden states into one vector per prompt.

`PoolingParams` is the user-facing, per-request half (vLLM-shaped); `PoolerConfig` is the
model's half, read once from the checkpoint by `load_pooler_config`:

1. A sentence-transformers checkpoint says it in `modules.json`: a `Transformer` module,
   a `Pooling` module whose `config.json` picks the mode (`pooling_mode_mean_tokens`,
   `..._cls_token`, `..._max_tokens`, `..._lasttoken`), and an optional `Normalize` module
   (L2 normalisation). `sentence_bert_config.json`'s `max_seq_length` caps the prompt length.
   Other modules (Dense projections, ...) are refused rather than silently skipped.
2. Without those files, vLLM's defaults apply: CLS pooling for BERT-style encoders, last
   token for decoders, and L2 normalisation (for `embed`).

Imports nothing of jaxmm and no JAX.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

POOLING_TYPES = ("MEAN", "CLS", "LAST", "MAX")
# set (through hf_overrides) on the HF config of a generative model served as a pooling
# model: its compute_logits then returns the final hidden states (jaxmm.engine.hidden_pooling)
POOLING_HIDDEN_ATTR = "jaxmm_pooling_hidden_states"

# sentence-transformers' 1_Pooling/config.json flags -> our pooling type
_ST_MODES = {
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_max_tokens": "MAX",
    "pooling_mode_lasttoken": "LAST",
    "pooling_mode_mean_sqrt_len_tokens": None,  # not supported
    "pooling_mode_weightedmean_tokens": None,  # not supported
}


@dataclass
class PoolingParams:
    """Per-request pooling options (vLLM's names).

    `dimensions`: the embedding size asked for; only the model's own size is accepted (no
    Matryoshka truncation). `normalize`: L2-normalise the vector; None takes the model's
    default (its sentence-transformers `Normalize` module, else True).
    """

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool)
            or not isinstance(self.dimensions, int)
            or self.dimensions < 1
        ):
            raise ValueError(
                f"PoolingParams.dimensions must be an integer >= 1 or None, got {self.dimensions!r}"
            )
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(
                f"PoolingParams.normalize must be a bool or None, got {self.normalize!r}"
            )


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str  # one of POOLING_TYPES
    normalize: bool  # default when a request leaves PoolingParams.normalize unset
    max_seq_length: int | None = None  # sentence-transformers' cap on prompt length
    source: str = "default"  # "sentence-transformers" | "default"

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}"
            )


def _read_json(path: str) -> dict | list | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _st_pooling_type(cfg: dict, where: str) -> str:
    modes = [name for name in _ST_MODES if cfg.get(name)]
    if len(modes) != 1:
        raise ValueError(
            f"{where}: exactly one pooling mode must be on, got {modes or 'none'} "
            "(concatenated pooling modes are not supported)"
        )
    kind = _ST_MODES[modes[0]]
    if kind is None:
        raise ValueError(f"{where}: {modes[0]} is not supported")
    return kind


def load_pooler_config(model_dir: str | None, default_pooling_type: str = "CLS") -> PoolerConfig:
    """The model's pooling from its sentence-transformers files, else vLLM's defaults."""
    modules = _read_json(os.path.join(model_dir, "modules.json")) if model_dir else None
    if not modules:
        return PoolerConfig(default_pooling_type, normalize=True)
    pooling_type, normalize = default_pooling_type, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            where = os.path.join(model_dir, module.get("path", ""), "config.json")
            cfg = _read_json(where)
            if cfg is None:
                raise ValueError(f"the sentence-transformers Pooling module has no {where}")
            pooling_type = _st_pooling_type(cfg, where)
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(
                f"sentence-transformers module {module.get('type')!r} is not supported "
                "(supported: Transformer, Pooling, Normalize)"
            )
    st = _read_json(os.path.join(model_dir, "sentence_bert_config.json")) or {}
    max_len = st.get("max_seq_length")
    return PoolerConfig(
        pooling_type,
        normalize=normalize,
        max_seq_length=int(max_len) if max_len else None,
        source="sentence-transformers",
    )


def override_pooler_config(pooler: PoolerConfig, overrides: dict | None) -> PoolerConfig:
    """vLLM's `pooler_config` ({"pooling_type": "LAST", "normalize": true}) over the
    checkpoint's own pooling."""
    if not overrides:
        return pooler
    unknown = sorted(set(overrides) - {"pooling_type", "normalize"})
    if unknown:
        raise ValueError(
            f"pooler_config keys {unknown} are not supported; supported: pooling_type, normalize"
        )
    kind = overrides.get("pooling_type", pooler.pooling_type)
    kind = kind.upper() if isinstance(kind, str) else kind
    normalize = overrides.get("normalize", pooler.normalize)
    if not isinstance(normalize, bool):
        raise ValueError(f"pooler_config normalize must be true or false, got {normalize!r}")
    return PoolerConfig(kind, normalize, pooler.max_seq_length, "pooler_config")
