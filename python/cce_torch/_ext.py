"""Building and loading the compiled operators (torch.ops.cce.*).

The library is found, in this order, at $CCE_TORCH_LIBRARY (a prebuilt shared object) or built on first use with
torch.utils.cpp_extension into $CCE_TORCH_BUILD_DIR (default: python/build next to this package). Without a CUDA
toolkit the CPU operators alone are built. Ahead of time (no package import):

    MAX_JOBS=1 python3 python/cce_torch/_ext.py BUILD_DIR     # prints the shared object's path
"""

import os
import pathlib

import torch

_PACKAGE = pathlib.Path(__file__).resolve().parent
_INCLUDE = _PACKAGE.parents[1] / "include"
_NAME = "cce_torch_ext"
# sm_80 covers Ampere and later through the portable kernels; sm_90a adds the Hopper build.
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
# PyTorch compiles extensions with the half/bfloat16 operators and conversions switched off; the library's kernels
# use them, so they are switched back on for this translation unit.
_HALF_FLAGS = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-U__CUDA_NO_HALF2_OPERATORS__"]
_loaded = False


def default_build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CCE_TORCH_BUILD_DIR", _PACKAGE.parent / "build"))


def build(build_dir=None, verbose=False, with_cuda=None) -> pathlib.Path:
    """Compiles the operators (MAX_JOBS bounds the parallel compile jobs); returns the shared object's path."""
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = cpp_extension.CUDA_HOME is not None
    build_dir = pathlib.Path(build_dir or default_build_dir())
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [_PACKAGE / "csrc" / "ops.cpp"] + ([_PACKAGE / "csrc" / "ops_cuda.cu"] if with_cuda else [])
    includes = [str(_INCLUDE)]
    if with_cuda:  # host files include <cuda_bf16.h>, which needs CCCL's headers under CUDA 13
        includes += [os.path.join(cpp_extension.CUDA_HOME, "include", "cccl")]
    cpp_extension.load(
        name=_NAME,
        sources=[str(s) for s in sources],
        extra_include_paths=includes,
        # the C++ standard is torch's own (C++17 or later: newer releases need C++20), which the library supports
        extra_cflags=["-O2"],
        # one translation unit: nvcc's threads compile its two images at once, where MAX_JOBS cannot
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "--threads=2"] + _HALF_FLAGS + CUDA_ARCH_FLAGS,
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    # cpp_extension names a rebuild with changed sources <name>_v<k>.so: the newest one is this build
    return max(build_dir.glob(f"{_NAME}*.so"), key=lambda p: p.stat().st_mtime)


def load() -> None:
    """Registers torch.ops.cce.* once per process."""
    global _loaded
    if _loaded:
        return
    prebuilt = os.environ.get("CCE_TORCH_LIBRARY")
    if prebuilt:
        torch.ops.load_library(prebuilt)
    else:
        build()  # cpp_extension.load with is_python_module=False loads the library itself
    _loaded = True


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the cce operators ahead of time.")
    parser.add_argument("build_dir", nargs="?", default=None)
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    print(build(args.build_dir, verbose=True, with_cuda=False if args.cpu_only else None))
