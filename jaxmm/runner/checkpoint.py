"""Open a local checkpoint: HF config, tokenizer, EOS ids and a tensor stream.

A checkpoint is a directory in HF layout (`config.json` + `*.safetensors`) or a GGUF file
(or a directory holding one). Nothing is downloaded: a model that is not on disk is a
clear error. The config and tokenizer of the common text models are read without importing
torch (see hf_config.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from jaxmm.weights.hf_config import load_config, tokenizer_class


@dataclass
class Checkpoint:
    path: str
    hf_config: object
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]]
    eos_token_ids: list[int]
    tokenizer_path: str | None  # tokenizer directory, or None when built in memory
    tokenizer: object | None = None  # a ready tokenizer (GGUF)
    processor_path: str | None = None


def _eos_ids(model_dir: str, hf_config) -> list[int]:
    ids: list[int] = []

    def add(value) -> None:
        if value is None:
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen):
        with open(gen) as f:
            add(json.load(f).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    text_config = getattr(hf_config, "text_config", None)
    if text_config is not None:
        add(getattr(text_config, "eos_token_id", None))
    return ids


def apply_hf_overrides(hf_config, overrides: dict) -> None:
    """vLLM's `hf_overrides`: set each key on the HF config; a JSON object given for a
    sub-config (text_config, vision_config, ...) updates that sub-config key by key."""
    for key, value in overrides.items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and hasattr(current, "__dict__"):
            apply_hf_overrides(current, value)
        else:
            setattr(hf_config, key, value)


def open_checkpoint(
    model: str, load_format: str = "auto", hf_overrides: dict | None = None
) -> Checkpoint:
    ck = _open_checkpoint(model, load_format)
    if hf_overrides:
        apply_hf_overrides(ck.hf_config, hf_overrides)
    return ck


def _open_checkpoint(model: str, load_format: str) -> Checkpoint:
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model {model!r} is not a local directory or file. jaxmm does not download from "
            "a model hub: pass the path of a checkpoint directory (config.json + *.safetensors) "
            "or a .gguf file."
        )
    if model.endswith(".gguf") or (
        os.path.isdir(model)
        and not os.path.exists(os.path.join(model, "config.json"))
        and any(f.endswith(".gguf") for f in os.listdir(model))
    ):
        from jaxmm.weights.gguf import load_gguf

        ck = load_gguf(model)
        return Checkpoint(
            path=model,
            hf_config=ck.hf_config,
            tensors=ck.tensors,
            eos_token_ids=list(ck.eos_token_ids),
            tokenizer_path=None,
            tokenizer=ck.tokenizer,
        )
    if not os.path.isdir(model) or not os.path.exists(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model!r} has no config.json: not an HF checkpoint directory")
    from jaxmm.weights.safetensors_io import iter_safetensors

    hf_config = load_config(model)
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be auto, safetensors or dummy; got {load_format!r}")
    return Checkpoint(
        path=model,
        hf_config=hf_config,
        tensors=lambda: iter_safetensors(model),
        eos_token_ids=_eos_ids(model, hf_config),
        tokenizer_path=model,
        processor_path=model,
    )


def load_tokenizer(ck: Checkpoint, tokenizer: str | None = None):
    if ck.tokenizer is not None and tokenizer is None:
        return ck.tokenizer
    path = tokenizer or ck.tokenizer_path
    if path is None:
        raise ValueError("this checkpoint carries no tokenizer; pass tokenizer=...")
    cls = tokenizer_class(path)  # None: let AutoTokenizer choose (it imports torch)
    if cls is None:
        from transformers import AutoTokenizer

        cls = AutoTokenizer
    return cls.from_pretrained(path, local_files_only=True)
