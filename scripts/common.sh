# Shared by test.sh and demo.sh (sourced, not run): prerequisites and the CMake configure step.
#
# Environment:
#   BUILD_DIR                build directory (default: build)
#   JOBS                     parallel build jobs (default: 2)
#   CCE_CUDA_ARCHITECTURES   CMAKE_CUDA_ARCHITECTURES (default: 80;90a)
#   CUDA_HOME                CUDA toolkit, used when nvcc is not on PATH (default: /usr/local/cuda)

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-2}
CCE_CUDA_ARCHITECTURES=${CCE_CUDA_ARCHITECTURES:-80;90a}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs the Debian packages the build needs, only if some are missing.
cce_install_packages() {
  local wanted=(cmake ninja-build g++ catch2 libbenchmark-dev) missing=() p
  if ! command -v dpkg-query >/dev/null; then
    log "not a Debian system: assuming ${wanted[*]} (or equivalents) are installed"
    return
  fi
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return

  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "missing packages (${missing[*]}) and neither root nor sudo"
    sudo=(sudo)
  fi
  log "installing ${missing[*]}"
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Puts the toolkit's nvcc on PATH if it is not there already.
cce_find_nvcc() {
  if ! command -v nvcc >/dev/null; then
    local cuda=${CUDA_HOME:-/usr/local/cuda}
    [[ -x $cuda/bin/nvcc ]] || die "nvcc not found on PATH nor in $cuda/bin (set CUDA_HOME)"
    export PATH="$cuda/bin:$PATH"
  fi
  log "nvcc: $(command -v nvcc), $(nvcc --version | grep -o "release [0-9.]*")"
}

# Configures BUILD_DIR with Ninja in Release, tests, benchmarks and examples on; extra arguments go to cmake.
cce_configure() {
  cce_install_packages
  cce_find_nvcc
  log "configuring $BUILD_DIR (CUDA architectures $CCE_CUDA_ARCHITECTURES)"
  cmake -S . -B "$BUILD_DIR" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="$CCE_CUDA_ARCHITECTURES" \
    -DCCE_BUILD_TESTS=ON -DCCE_BUILD_BENCH=ON -DCCE_BUILD_EXAMPLES=ON \
    "$@"
}
