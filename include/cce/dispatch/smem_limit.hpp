// A kernel's dynamic shared-memory limit (cudaFuncAttributeMaxDynamicSharedMemorySize) belongs to the function in a
// device's context: once raised it stays, so it is raised on the kernel's first launch on each device rather than
// before every launch (the call is not free, and the minimal schedule launches hundreds of kernels per step).
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace cce::detail {

// Whether Kernel may take `smem` bytes of dynamic shared memory on the current device; false when the device cannot
// give them or has no image of the kernel (the error is cleared). The limit is raised once per device: to `most`, the
// largest request the kernel ever makes, where the device has that much, else to `smem` (a kernel whose requests
// differ has at most two sizes, so every caller on one device raises to the same one).
template <auto Kernel>
bool allow_dynamic_smem(std::size_t smem, std::size_t most = 0) {
  static std::atomic<std::uint32_t> granted[64];  // bytes raised to per device ordinal below 64 (static: zeroed)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  std::atomic<std::uint32_t>* known = device >= 0 && device < 64 ? &granted[device] : nullptr;  // else ask every time
  if (known != nullptr && known->load(std::memory_order_acquire) >= smem) return true;
  const std::size_t sizes[2] = {most, smem};
  for (int i = most > smem ? 0 : 1; i < 2; ++i) {
    const std::size_t bytes = sizes[i];
    if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) == cudaSuccess) {
      if (known != nullptr) {
        std::uint32_t now = known->load(std::memory_order_relaxed);
        while (now < bytes && !known->compare_exchange_weak(now, std::uint32_t(bytes), std::memory_order_release)) {
        }
      }
      return true;
    }
    cudaGetLastError();
  }
  return false;
}

}  // namespace cce::detail
