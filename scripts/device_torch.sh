#!/usr/bin/env bash
# The PyTorch side of cce on a GPU machine (torch, triton, numpy, matplotlib and pytest installed; no internet).
#
#   scripts/device_torch.sh test                       pytest python/tests
#   scripts/device_torch.sh compare [compare.py args]  bench/compare.py (default: --parts table,accuracy)
#   scripts/device_torch.sh parity [train_parity.py args]
#
# Carried wheels in .whl/*.whl (cut-cross-entropy, liger-kernel) are installed into /tmp/site. The operators are
# loaded from the prebuilt python/build/cce_torch_ext*.so when it loads, else built here (MAX_JOBS, default 8).
# Results go to $OUT (default ./out) as one tarball, torch-PHASE.tar.gz, plus the log.
set -uo pipefail
phase=${1:?phase: test, compare or parity}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/out}
mkdir -p "$out"
results=$(mktemp -d)
log="$results/$phase.log"
cd "$root"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} >"$results/device.txt" 2>&1
cat "$results/device.txt"

# The prebuilt library if it loads with this torch, else a build for sm_80 and sm_90a.
lib=$(ls -t python/build/cce_torch_ext*.so 2>/dev/null | head -1)
if [ -n "$lib" ] && python3 -c "import torch; torch.ops.load_library('$lib'); torch.ops.cce.forward" 2>>"$log"; then
  echo "using prebuilt $lib" | tee -a "$log"
else
  echo "building the operators" | tee -a "$log"
  start=$(date +%s)
  lib=$(MAX_JOBS=${MAX_JOBS:-8} python3 python/cce_torch/_ext.py /tmp/cce_torch_build 2>>"$log" | tail -1)
  echo "built $lib in $(($(date +%s) - start)) s" | tee -a "$log"
fi
export CCE_TORCH_LIBRARY=$lib

status=0
case "$phase" in
  test)
    python3 -m pytest -q -rs python/tests --junitxml="$results/pytest.xml" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    ;;
  compare)
    [ $# -gt 0 ] || set -- --parts table,accuracy
    python3 bench/compare.py --out "$results" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    ;;
  parity)
    python3 bench/train_parity.py --out "$results" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    ;;
  *)
    echo "unknown phase $phase" >&2
    status=2
    ;;
esac
tar -czf "$out/torch-$phase.tar.gz" -C "$results" .
cp "$log" "$out/"
echo "results: $out/torch-$phase.tar.gz (exit $status)"
exit "$status"
