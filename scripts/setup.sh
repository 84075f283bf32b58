#!/usr/bin/env bash
# Set up .venv with everything the toolkit, its demo and its tests need. Safe to run again.
#
#   bash scripts/setup.sh
#
# torch and torchvision go in first and together (TORCH_SPEC, default the CPU-capable build this
# project is tested with); every later install is constrained to the torch that is there, so no
# requirement can pull another build. A GPU user installs their own CUDA torch first, into .venv
# or with VENV pointing at their environment: an importable torch is kept as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC" >&2
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
    "$PY" -m pip install --quiet $TORCH_SPEC
fi
"$PY" - >"$VENV/torch-constraints.txt" <<'PYEOF'
from importlib.metadata import version
print(f"torch=={version('torch')}\ntorchvision=={version('torchvision')}")
PYEOF

requirements=(requirements.txt requirements_web_demo.txt requirements_test.txt requirements_bench.txt)
stamp="$VENV/.requirements.sha256"
wanted="$(cat "${requirements[@]}" requirements_gptq.txt "$VENV/torch-constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
    echo "setup: installing ${requirements[*]}" >&2
    "$PY" -m pip install --quiet -c "$VENV/torch-constraints.txt" "${requirements[@]/#/-r}"
    # without its declared dependencies: see the note in requirements_gptq.txt
    "$PY" -m pip install --quiet --no-deps -c "$VENV/torch-constraints.txt" -r requirements_gptq.txt
    echo "$wanted" >"$stamp"
fi
echo "setup: ready ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
