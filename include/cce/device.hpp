// The device description that size queries and dispatch use, read once from the CUDA runtime.
#pragma once

#include <cuda_runtime_api.h>

#include <cce/dispatch/plan.hpp>
#include <cce/status.hpp>

namespace cce {

// Reads the current device's compute capability and multiprocessor count (no synchronisation).
inline status current_device(device_info& info) {
  int dev = 0, major = 0, minor = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return status::cuda_error;
  }
  info.arch = major * 10 + minor;
  info.sm_count = sms;
  return status::success;
}

}  // namespace cce
