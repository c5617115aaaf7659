"""The multimodal front end is host-only: no JAX, no reach into the engine's insides.

`jaxmm/multimodal/` parses, fetches, decodes, runs HF processors and hashes; the engine's
encoder stage runs the encoders. The front end is given the model's declared multimodal
interface, the tokenizer and the processor's files, and reaches the engine, if at all,
only through the two accessors that hand out front ends (`mm_frontend()`,
`audio_frontend()`) and the tokenizer. This scan keeps it that way.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import jaxmm.multimodal

PACKAGE = pathlib.Path(jaxmm.multimodal.__file__).parent
# what a front end may not touch: the engine's and runner's insides, device state
FORBIDDEN_ATTRIBUTES = {
    "runner",
    "scheduler",
    "block_manager",
    "model_obj",
    "graphdef",
    "params",
    "kv_caches",
    "encoder_cache",
    "__dict__",
}


def _modules() -> list[pathlib.Path]:
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) > 5
    return files


def test_no_module_imports_jax():
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in ("jax", "jaxlib", "flax"), f"{path.name} imports {name}"
                assert not name.startswith(("jaxmm.engine", "jaxmm.runner", "jaxmm.models")), (
                    f"{path.name} imports {name}: the front end sits below them"
                )


def test_no_module_reaches_into_the_engine():
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
                raise AssertionError(f"{path.name}:{node.lineno} reads .{node.attr}")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "engine"
                and node.attr not in ("mm_frontend", "audio_frontend", "tokenizer", "is_multimodal")
            ):
                raise AssertionError(f"{path.name}:{node.lineno} reads engine.{node.attr}")


def test_importing_the_front_end_loads_no_jax():
    code = (
        "import sys; import jaxmm.multimodal.inputs, jaxmm.multimodal.audio_inputs, "
        "jaxmm.multimodal.chat_parts, jaxmm.multimodal.media; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
