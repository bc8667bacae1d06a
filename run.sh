#!/usr/bin/env bash
# Sets up .venv on first use, then runs one of:
#   bash run.sh test      ruff, mypy --strict on the library, then the test suite
#   bash run.sh main      a short comparison on CIFAR-10 that shows the method (CPU), then the committed tables
#   bash run.sh docs      the documentation site into site/ (mkdocs build --strict)
#   bash run.sh test-oldest  the test suite on the oldest torch and kornia that pyproject.toml allows (.venv-oldest)
#   bash run.sh <script>  any python command inside the venv, e.g. bash run.sh benchmarks/step.py
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# the oldest versions pyproject.toml allows (and test-oldest installs); keep the two in step
OLDEST=("torch==2.7.1" "torchvision==0.22.1" "kornia==0.8.0")
if [ "${1:-}" = "test-oldest" ]; then
  shift
  V=.venv-oldest
  if [ ! -x $V/bin/python ] || [ ! -f $V/.installed ]; then
    "$PYTHON" -m venv $V
    $V/bin/pip install --quiet --upgrade pip
    printf '%s\n' "${OLDEST[@]}" > $V/constraints.txt  # nothing the extras pull in may upgrade them
    $V/bin/pip install --quiet -c $V/constraints.txt "${OLDEST[@]}"
    $V/bin/pip install --quiet -c $V/constraints.txt -e ".[test,bench,examples]"
    touch $V/.installed
  fi
  $V/bin/python -c "import torch, kornia; print('torch', torch.__version__, 'kornia', kornia.__version__)"
  exec $V/bin/python -m pytest "$@"
fi
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # torch first, pinned, so nothing resolves to a newer (multi-GB) build
  .venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install --quiet -e ".[test,bench,examples,docs]"
  touch .venv/.installed
fi
PY=.venv/bin/python
cmd=${1:-test}
shift || true
case "$cmd" in
  test)
    "$PY" -m ruff check competitive tests benchmarks examples
    "$PY" -m mypy --strict competitive
    "$PY" -m pytest "$@"
    ;;
  main)
    "$PY" benchmarks/train.py --preset quick "$@"
    ;;
  docs)
    NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --site-dir site "$@"
    ;;
  *)
    "$PY" "$cmd" "$@"
    ;;
esac
