#!/usr/bin/env bash
# GPU checks of the Hopper kernels, in phases with time limits (a hung kernel must not take the whole call):
#   scripts/device_hopper.sh BUILD   tests of the sm_90a path, a memcheck of it, the forward benchmark, a profile.
# Results go to $OUT (default ./out) as one tarball.
set -uo pipefail
build=${1:?build folder}
out=${OUT:-out}
res=$(mktemp -d)
export LD_LIBRARY_PATH="$build:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$res/device.txt" 2>&1
t="$build/tests/linear_cross_entropy_test"
phase() {  # name seconds command...
  local name=$1 secs=$2
  shift 2
  echo "== $name" | tee -a "$res/summary.txt"
  timeout "$secs" "$@" >"$res/$name.txt" 2>&1
  local rc=$?
  tail -n 3 "$res/$name.txt" | tee -a "$res/summary.txt"
  echo "rc=$rc" | tee -a "$res/summary.txt"
  return $rc
}
if phase hopper 150 "$t" "[hopper]" --reporter compact; then
  phase tests 240 "$t" "[regimes],[random],[errors],[determinism],[lora]" --reporter compact
  phase memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 "$t" "[errors]" --reporter compact
  phase racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 3 "$t" "[errors]" --reporter compact
  phase bench 300 "$build/bench/cce_bench" \
    --benchmark_filter="${BENCH_FILTER:-^(gemma2|llama3|mistral-nemo|phi3.5|qwen2.5|gpt2)/lm-like/(gemm|fw|fw-portable)/}"
  phase ncu 200 ncu --kernel-name regex:forward_kernel --launch-skip 0 --launch-count 1 --set full \
    "$build/bench/cce_bench" --benchmark_filter="${NCU_FILTER:-^gemma2/lm-like/fw/}"
fi
tar -C "$res" -czf "$out/hopper_results.tgz" .
cat "$res/summary.txt"
