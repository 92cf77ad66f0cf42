#!/usr/bin/env bash
# Conformance of the SONAR adapter against SONAR's own code (opt-in, not in the test suite).
#
# Builds a virtual environment with sonar-space and fairseq2 from PyPI, makes tiny random SONAR
# text and speech encoders there with SONAR's own builders, saves them as fairseq2 checkpoints
# and records their per-layer outputs and sentence embeddings on fixed inputs; then the project's
# converter and adapter (this checkout, its own environment) read the same checkpoints and inputs
# and every output is compared. Results: benchmarks/results/conformance.{json,md}.
#
#   benchmarks/conformance/sonar.sh [VENV_DIR]      (default /tmp/xmodal-conformance)
#
# Versions: sonar-space 0.5.0 asks for fairseq2>=0.5.2; fairseq2 0.5.2 pins fairseq2n==0.5.2,
# whose PyPI wheel pins torch==2.8.0. sonar-space's `cpu` extra names torch==2.6.0+cpu, which
# only download.pytorch.org serves; PyPI's torch 2.8.0 is its CUDA build (several GB), run here
# on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-/tmp/xmodal-conformance}"
WORK="$VENV/work"
PY="${PYTHON:-python3}"

SONAR_VERSION=0.5.0
FAIRSEQ2_VERSION=0.5.2
TORCH_VERSION=2.8.0

# fairseq2n loads libsndfile when imported.
if ! ldconfig -p | grep -q "libsndfile\.so\.1"; then
  if [[ $EUID -eq 0 ]]; then
    apt-get install -y libsndfile1 || { apt-get update && apt-get install -y libsndfile1; }
  else
    echo "fairseq2n needs libsndfile: install Debian's libsndfile1 and rerun" >&2
    exit 1
  fi
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import sonar, fairseq2" 2>/dev/null; then
  # The machine's pip constraints (if any) cap torch above 2.8.0, so they do not get in the way.
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" "torchaudio==$TORCH_VERSION" \
    "fairseq2==$FAIRSEQ2_VERSION" "fairseq2n==$FAIRSEQ2_VERSION" "sonar-space==$SONAR_VERSION"
fi

mkdir -p "$WORK"
cd "$ROOT"
OMP_NUM_THREADS=1 PYTHONPATH="$ROOT" "$PY" -m benchmarks.conformance.sonar --stage=prepare \
  --work="$WORK"
OMP_NUM_THREADS=1 "$VENV/bin/python" -P "$ROOT/benchmarks/conformance/sonar_reference.py" "$WORK"
OMP_NUM_THREADS=1 PYTHONPATH="$ROOT" "$PY" -m benchmarks.conformance.sonar --stage=compare \
  --work="$WORK" --out=benchmarks/results/conformance.json
