#!/usr/bin/env bash
# Tunes the presets of include/cce/presets on this machine's GPU with bench/tune/tune.py (see docs/tuning.md):
#
#   scripts/device_tune.sh [model ...]     default: all six models of shared/bench-spec.md
#
# Candidate binaries are compiled once into build-tune/ and shared by the models. Writes the headers into
# include/cce/presets/ and, to $OUT (default ./out), tune.tar.gz with the headers, each model's table and timings.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/out}
mkdir -p "$out"
res=$(mktemp -d)
cd "$root"
declare -A shape=([gemma2]="2304 256000" [llama3]="4096 128256" [mistral_nemo]="5120 131072"
                  [phi3_5]="3072 32064" [qwen2_5]="3584 152064" [gpt2]="768 50304")
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(gemma2 llama3 mistral_nemo phi3_5 qwen2_5 gpt2)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$res/device.txt" 2>&1
status=0
for m in "${models[@]}"; do
  read -r d v <<<"${shape[$m]}"
  start=$(date +%s)
  python3 bench/tune/tune.py --name "$m" --d "$d" --v "$v" >"$res/$m.md" 2>"$res/$m.log"
  rc=$?
  [ $rc -eq 0 ] || status=1
  echo "$m: $(($(date +%s) - start)) s (exit $rc)" | tee -a "$res/timings.txt"
done
mkdir -p "$res/presets" && cp include/cce/presets/*.hpp "$res/presets/" 2>/dev/null
tar -czf "$out/tune.tar.gz" -C "$res" .
cat "$res"/timings.txt "$res"/*.md
exit $status
