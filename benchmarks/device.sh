#!/usr/bin/env bash
# Issue 22's GPU benchmarks in one call, on a machine that has PyTorch, Lightning and CUDA but none of mmfl's other
# packages and no network (the lent H200 of this project's device tool, Python 3.12). Two steps:
#
#   here (with network):  bash benchmarks/device.sh --wheels
#       downloads the wheels that machine lacks into .whl/ (about 5 MiB; .whl/ is git-ignored)
#   there (from the repository root, with .whl/ carried beside it):  OUT=DIR bash benchmarks/device.sh
#       installs them into /tmp/site and runs, on ViT-B/16 with random weights and Lightning's cuda accelerator:
#       benchmarks.run without Flower (efficiency, memory, cache) into DIR/bench, then benchmarks.scale, CoOp and
#       MaPLe at 10 and 10,000 clients (1% a round), into DIR/scale; logs in DIR/*.log. Under 10 minutes on an H200.
#
# Settings (environment): PYTHON (python3), PYVER (3.12: the Python the wheels are for), ACCELERATOR (cuda),
# SIZES ("10 10000"), ROUNDS (2). A dry run on a CPU: PYTHON=.venv/bin/python PYVER=3.11 ACCELERATOR=cpu
# SIZES="10 100" ROUNDS=1 BACKBONE=mmfl-tiny, after `--wheels` with the same PYTHON and PYVER.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
# mmfl's packages that the device's image lacks (its image has torch, lightning, torchmetrics, timm, transformers,
# huggingface-hub, pandas, pyarrow, scikit-learn, safetensors...), pinned to what this project's CI installs
WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 flwr-datasets==0.6.1
  jsonargparse==4.53.0 typeshed_client==2.15.0
)
if [ "${1:-}" = --wheels ]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do platforms+=(--platform "$p"); done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}"
  echo "wheels for Python $PYVER in .whl/: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"
  exit 0
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "benchmarks/device.sh: no wheels in .whl/: run \`bash benchmarks/device.sh --wheels\` where pip can reach PyPI," \
    "and carry .whl/ to this machine" >&2
  exit 2
fi
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ACCELERATOR=${ACCELERATOR:-cuda}
BACKBONE=${BACKBONE:-ViT-B-16}
read -r -a sizes <<<"${SIZES:-10 10000}"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda:", torch.cuda.is_available() and torch.cuda.get_device_name())'
"$PYTHON" -m benchmarks.run --out "$OUT/bench" --backbone "$BACKBONE" --accelerator "$ACCELERATOR" --no-flower \
  2>&1 | tee "$OUT/bench.log"
"$PYTHON" -m benchmarks.scale --out "$OUT/scale" --parts coop maple --sizes "${sizes[@]}" --rounds "${ROUNDS:-2}" \
  --backbone "$BACKBONE" --accelerator "$ACCELERATOR" 2>&1 | tee "$OUT/scale.log"
