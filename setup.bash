#!/usr/bin/env bash
# One-command install into the active Python environment. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-python}"

# torch first, and only if it is missing: a bare `torch` requirement can pull several GB of
# CUDA wheels, and pip must never replace a torch the user already has.
if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') already installed, keeping it"
else
  echo "setup: installing torch==${TORCH_VERSION:-2.13.0}"
  "$PYTHON" -m pip install --no-compile "torch==${TORCH_VERSION:-2.13.0}"
fi

# Pin the installed torch so resolving the other dependencies cannot swap it out.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$("$PYTHON" -c 'import torch; print(torch.__version__)')" >"$constraints"
echo "setup: installing attention-simulator in editable mode with the dev extra"
# constraints-dev.txt pins the test and lint tools, so every fresh environment tests alike
"$PYTHON" -m pip install -q --no-compile -c "$constraints" -c constraints-dev.txt -e ".[dev]"

# pip byte-compiles one file at a time: compile what was installed on every core instead (files
# already compiled are skipped; a few packages ship files that are not Python 3 and fail: ignored)
echo "setup: byte-compiling the installed packages"
"$PYTHON" -m compileall -q -j 0 "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  >/dev/null || true

echo "setup: done. Next: python -m pytest -q --durations=15 (everything), or -m \"not slow\" (the inner loop)"
