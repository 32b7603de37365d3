#!/usr/bin/env bash
# Runs one phase of the GPU checks on a machine with a GPU, from a build made elsewhere (tests need no
# Catch2 there: they link statically; the benchmark needs libbenchmark.so.1debian copied into the build folder).
#
#   scripts/device_check.sh tests   BUILD   GPU tests (ctest -L gpu)
#   scripts/device_check.sh sanitize BUILD  compute-sanitizer memcheck, racecheck, synccheck, initcheck on a subset
#                                           (forward, both backward operating points, loss_and_grad, LoRA, errors,
#                                           extreme values: small shapes, a few minutes per tool)
#   scripts/device_check.sh bench   BUILD [FILTER]   the benchmark of shared/bench-spec.md, JSON and text
#
# Results go to $OUT (default ./out).
set -uo pipefail
phase=${1:?phase: tests, sanitize or bench}
build=${2:?build folder}
out=${OUT:-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$build:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv >"$out/device.txt" 2>&1
git rev-parse HEAD >"$out/commit.txt" 2>/dev/null || true

case "$phase" in
  tests)
    status=0
    for test in linear_cross_entropy_test reliability_test; do
      "$build/tests/$test" --reporter compact 2>&1 | tee -a "$out/gpu_tests.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
    exit $status
    ;;
  sanitize)
    status=0
    # test binary, then its tags: small shapes only ([scale], [graph] and the randomized sweep are left out).
    subsets=("linear_cross_entropy_test" "[errors],[determinism],[lora]"
             "reliability_test" "[sanitize],[bad-input],[extreme]")
    for tool in memcheck racecheck synccheck initcheck; do
      for ((i = 0; i < ${#subsets[@]}; i += 2)); do
        echo "== compute-sanitizer --tool $tool ${subsets[i]} ${subsets[i + 1]}" | tee -a "$out/sanitizer.txt"
        compute-sanitizer --tool "$tool" --error-exitcode 3 "$build/tests/${subsets[i]}" "${subsets[i + 1]}" \
          --reporter compact 2>&1 | tail -n 5 | tee -a "$out/sanitizer.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      done
    done
    exit $status
    ;;
  bench)
    filter=${3:-.}
    "$build/bench/cce_bench" --benchmark_filter="$filter" --benchmark_out="$out/bench.json" \
      --benchmark_out_format=json 2>&1 | tee "$out/bench.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
