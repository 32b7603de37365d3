// CUDA-event timing of a callable on the default stream, shared by the benchmark and the tuning tools.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "bench_data.cuh"

namespace cce_bench {

// Times one call at a time: events recorded around it, then waited for. Also keeps how long the host took to enqueue
// the call: where that comes near the events' time, the GPU waited for launches.
class event_timer {
 public:
  event_timer() {
    CHECK_CUDA(cudaEventCreate(&start_));
    CHECK_CUDA(cudaEventCreate(&stop_));
  }
  ~event_timer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  event_timer(const event_timer&) = delete;
  event_timer& operator=(const event_timer&) = delete;

  // Milliseconds of one call of `body`.
  template <class Body>
  float ms(Body&& body) {
    CHECK_CUDA(cudaEventRecord(start_));
    const auto enqueue_start = std::chrono::steady_clock::now();
    body();
    enqueue_ms_ = std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - enqueue_start).count();
    CHECK_CUDA(cudaEventRecord(stop_));
    CHECK_CUDA(cudaEventSynchronize(stop_));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start_, stop_));
    return ms;
  }
  // Host milliseconds spent in the last call's body.
  float enqueue_ms() const { return enqueue_ms_; }

 private:
  cudaEvent_t start_{}, stop_{};
  float enqueue_ms_ = 0.f;
};

inline double median(std::vector<float> times) {
  if (times.empty()) return 0.0;
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Median of `iterations` timings of `body`, after one warm-up call.
template <class Body>
double median_ms(int iterations, Body&& body) {
  event_timer timer;
  body();
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) times.push_back(timer.ms(body));
  CHECK_CUDA(cudaGetLastError());
  return median(times);
}

}  // namespace cce_bench
