#!/usr/bin/env bash
# GPU checks in phases with time limits (a hung kernel must not take the whole call), from a build made elsewhere:
#   scripts/device_hopper.sh tests BUILD    linear_cross_entropy_test ([hopper] first, then the rest) and vocab_sort_test
#   scripts/device_hopper.sh checks BUILD   reliability_test, vocab_parallel_test, then memcheck and racecheck on a subset
#   scripts/device_hopper.sh bench BUILD   the benchmark (BENCH_FILTER) and one Nsight Compute profile (NCU_FILTER)
#   scripts/device_hopper.sh profile BUILD   the Nsight Compute profile alone (NCU_FILTER, NCU_KERNELS, NCU_COUNT)
#   scripts/device_hopper.sh examples BUILD   examples 02-05 (03 and 05 read data/corpus.txt)
#   scripts/device_hopper.sh quick BUILD    about four minutes when device time is short: [hopper], [shapes], the rest
#                                           of linear_cross_entropy_test, vocab_sort_test, then a few benchmark rows
# Results go to $OUT (default ./out) as one tarball; the summary is printed last.
set -uo pipefail
what=${1:?tests or bench}
build=${2:?build folder}
out=${OUT:-out}
mkdir -p "$out"
res=$(mktemp -d)
export LD_LIBRARY_PATH="$build:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$res/device.txt" 2>&1
t="$build/tests"
status=0
phase() {  # name seconds command...
  local name=$1 secs=$2
  shift 2
  echo "== $name" >>"$res/summary.txt"
  timeout "$secs" "$@" >"$res/$name.txt" 2>&1
  local rc=$?
  tail -n 3 "$res/$name.txt" >>"$res/summary.txt"
  echo "rc=$rc" >>"$res/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}
# Nsight Compute on one benchmark row: NCU_KERNELS (a regex) names the kernels, NCU_COUNT how many launches.
profile() {
  phase ncu 240 ncu --kernel-name "regex:${NCU_KERNELS:-forward_kernel}" --launch-skip 0 \
    --launch-count "${NCU_COUNT:-1}" --set full --export "$res/profile" \
    "$build/bench/cce_bench" --benchmark_filter="${NCU_FILTER:-^gpt2/lm-like/fw/}"
  ncu --import "$res/profile.ncu-rep" --page details >"$res/profile-details.txt" 2>&1
  ncu --import "$res/profile.ncu-rep" --page source --csv --print-source sass >"$res/profile-sass.csv" 2>/dev/null
  rm -f "$res/profile.ncu-rep"  # the text pages are what comes back
}
case "$what" in
  tests)
    if phase hopper 150 "$t/linear_cross_entropy_test" "[hopper]" --reporter compact; then
      phase gpu 240 "$t/linear_cross_entropy_test" "~[shapes]" --reporter compact
      phase shapes 120 "$t/linear_cross_entropy_test" "[shapes]" --reporter compact
      phase sort 150 "$t/vocab_sort_test" --reporter compact
    fi
    ;;
  quick)
    if phase hopper 60 "$t/linear_cross_entropy_test" "[hopper]" --reporter compact; then
      phase shapes 30 "$t/linear_cross_entropy_test" "[shapes]" --reporter compact
      phase gpu 90 "$t/linear_cross_entropy_test" "~[shapes]~[hopper]" --reporter compact
      phase sort 45 "$t/vocab_sort_test" --reporter compact
      phase bench 60 "$build/bench/cce_bench" \
        --benchmark_filter="${BENCH_FILTER:-^(llama3|gemma2)/lm-like/(gemm|fw-bw-chunked)/}"
    fi
    ;;
  checks)
    phase reliability 240 "$t/reliability_test" --reporter compact
    phase vocab 120 "$t/vocab_parallel_test" --reporter compact
    phase memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$t/linear_cross_entropy_test" \
      "[errors],[lora]" --reporter compact
    phase racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 3 "$t/linear_cross_entropy_test" \
      "[errors]" --reporter compact
    ;;
  examples)
    x="$build/examples"
    phase example02 60 "$x/02_find_package/02_find_package"
    phase example03 300 "$x/03_cuda_trainer/03_cuda_trainer" data/corpus.txt "${TRAIN_STEPS:-300}" 8192 50
    phase example04 120 "$x/04_lora_head/04_lora_head" 30
    phase example05 180 "$x/05_vocab_sorting/05_vocab_sorting" data/corpus.txt
    ;;
  bench)
    phase bench 420 "$build/bench/cce_bench" \
      --benchmark_filter="${BENCH_FILTER:-^(gemma2|llama3|mistral-nemo|phi3.5|qwen2.5|gpt2)/lm-like/(gemm|fw|fw-bw-chunked)/}"
    profile
    ;;
  profile)
    profile
    ;;
esac
tar -C "$res" -czf "$out/$what.tgz" .
cat "$res/summary.txt"
exit $status
