#!/bin/sh
# pip install "$@" inside an image build: from the wheelhouse copied to /wheels when it holds
# wheels (offline and air-gapped builds: nothing is fetched), else from the package indexes, torch
# from PyTorch's CPU index (a bare `torch` from PyPI is the multi-GB CUDA build). The versions are
# the ones tested together (/tmp/constraints.txt = docker/constraints.txt) either way.
set -eu
if ls /wheels/*.whl >/dev/null 2>&1; then
  exec pip install --no-index --find-links /wheels -c /tmp/constraints.txt "$@"
fi
case "$1" in
  torch==*) exec pip install "$@" --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;;
esac
exec pip install -c /tmp/constraints.txt "$@"
