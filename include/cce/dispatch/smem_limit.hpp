// A kernel's dynamic shared-memory limit (cudaFuncAttributeMaxDynamicSharedMemorySize) belongs to the function in a
// device's context: once raised it stays, so it is raised on the kernel's first launch on each device rather than
// before every launch (the call is not free, and the minimal schedule launches hundreds of kernels per step).
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace cce::detail {

// Whether Kernel may take `smem` bytes of dynamic shared memory (always the same for one kernel) on the current
// device; false when the device cannot give them or has no image of the kernel (the error is cleared).
template <auto Kernel>
bool allow_dynamic_smem(std::size_t smem) {
  static std::atomic<std::uint64_t> raised{0};  // a bit per device ordinal below 64
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const std::uint64_t bit = device < 64 ? std::uint64_t(1) << device : 0;  // higher ordinals ask every time
  if ((raised.load(std::memory_order_acquire) & bit) != 0) return true;
  if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  raised.fetch_or(bit, std::memory_order_release);
  return true;
}

}  // namespace cce::detail
