#!/usr/bin/env bash
# Builds and runs examples/01_minimal: on the GPU if one is visible, else with the CPU executor.
# See scripts/common.sh for the environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ ! -f examples/01_minimal/main.cu ]]; then
  log "examples/01_minimal/main.cu is not in this tree yet: nothing to run"
  exit 0
fi

cce_configure -DCCE_EXAMPLES_CUDA_ARCHITECTURES= "$@"  # every architecture of the build (test.sh sets one)
log "building 01_minimal with $JOBS jobs"
cmake --build "$BUILD_DIR" --parallel "$JOBS" --target 01_minimal
log "running"
"$BUILD_DIR/examples/01_minimal/01_minimal"
