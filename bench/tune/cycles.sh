#!/usr/bin/env bash
# Elapsed cycles of one kernel under Nsight Compute's locked clocks, for A/B comparisons of `candidate` builds:
# wall-clock medians move by several percent between calls on a power-capped GPU, these repeat to about 1 %.
#
#   SHAPES="N,D,V,SOFTCAP,REGIME ..." bench/tune/cycles.sh BINARY...     (KERNEL: a regex, default forward_kernel;
#                                                                          KERNEL_BASE=mangled matches it against
#                                                                          the mangled name, template arguments
#                                                                          included: 'forward_kernel.*Lb1E' is the
#                                                                          logit-keeping forward;
#                                                                          MODE=portable pins the portable kernels)
# Prints one line per shape and binary: the cycles of three launches after two warm-up ones.
set -uo pipefail
for s in ${SHAPES:?}; do
  IFS=, read -r n d v softcap regime <<<"$s"
  for b in "$@"; do
    cycles=$(timeout 120 ncu ${KERNEL_BASE:+--kernel-name-base "$KERNEL_BASE"} --kernel-name "regex:${KERNEL:-forward_kernel}" \
      --launch-skip 2 --launch-count 3 \
      --metrics gpc__cycles_elapsed.max "$b" "$n" "$d" "$v" "$softcap" "$regime" 4 ${MODE:+"$MODE"} 2>/dev/null |
      awk '/gpc__cycles_elapsed.max/ {printf "%s ", $3}')
    echo "$(basename "$b") $s $cycles"
  done
done
