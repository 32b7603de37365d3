// Timing for the tuning tools: the median of CUDA-event timings of a callable on the default stream.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "../bench_data.cuh"

namespace cce_bench {

// Median of `iterations` CUDA-event timings of `body`, after one warm-up call.
template <class Body>
double median_ms(int iterations, Body&& body) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  body();
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    body();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    times.push_back(ms);
  }
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace cce_bench
