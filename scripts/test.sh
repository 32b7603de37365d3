#!/usr/bin/env bash
# Builds everything and runs the tests: ./scripts/test.sh [extra cmake arguments, e.g. -DCCE_SANITIZE=address]
# On a machine without a GPU the GPU tests are reported as skipped. See scripts/common.sh for the environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The examples for the first architecture only (examples/CMakeLists.txt): the tests cover the kernels on every one.
cce_configure -DCCE_EXAMPLES_CUDA_ARCHITECTURES="${CCE_CUDA_ARCHITECTURES%%;*}" "$@"
log "building with $JOBS jobs"
cmake --build "$BUILD_DIR" --parallel "$JOBS"
log "testing"
ctest --test-dir "$BUILD_DIR" --output-on-failure
