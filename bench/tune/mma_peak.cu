// The ceiling of the portable kernels' instruction: bf16 mma.sync.m16n8k16 with fp32 accumulators, issued from
// registers only (no shared memory, no loads in the loop), on every SM, for 4, 8 and 16 warps per SM. Operands are
// non-zero hashed values: a tensor core multiplying zeros draws less power and may hold a higher clock.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -I include bench/tune/mma_peak.cu -o mma_peak && ./mma_peak
//
// Prints, per warps-per-SM count, the median of 10 timed launches in TFLOP/s (2 * 16 * 8 * 16 per instruction).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <cce/kernel/portable/ptx.cuh>

namespace {

constexpr int chains = 16;  // independent accumulators per warp, as a 32 x 64 warp tile has

__device__ std::uint32_t hashed_pair(std::uint32_t x) {
  x = (x ^ 61u) ^ (x >> 16);
  x *= 9u;
  x ^= x >> 4;
  x *= 0x27d4eb2du;
  x ^= x >> 15;
  // Two bf16 values in [0.5, 1): sign 0, exponent 126, hashed mantissa.
  return (0x3f00u | (x & 0x7fu)) | ((0x3f00u | ((x >> 8) & 0x7fu)) << 16);
}

__global__ void mma_loop(int iterations, float* sink) {
  using mma = cce::detail::ptx::mma_m16n8k16<__nv_bfloat16>;
  const std::uint32_t seed = blockIdx.x * blockDim.x + threadIdx.x;
  std::uint32_t a[4], b[chains][2];
  for (int i = 0; i < 4; ++i) a[i] = hashed_pair(seed * 7 + i);
#pragma unroll
  for (int j = 0; j < chains; ++j) {
    b[j][0] = hashed_pair(seed * 13 + 2 * j);
    b[j][1] = hashed_pair(seed * 13 + 2 * j + 1);
  }
  float acc[chains][4] = {};
  for (int it = 0; it < iterations; ++it) {
#pragma unroll
    for (int j = 0; j < chains; ++j) mma::run(acc[j], a, b[j][0], b[j][1]);
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < chains; ++j) s += acc[j][0] + acc[j][1] + acc[j][2] + acc[j][3];
  if (s == 0.f) *sink = s;  // never true for these operands; keeps the loop alive
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  float* sink = nullptr;
  cudaMalloc(&sink, sizeof(float));
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const int iterations = 4096, threads = 128;
  int resident_blocks = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident_blocks, mma_loop, threads, 0);
  std::printf("%s, %d SMs, at most %d resident warps per SM\nwarps/SM  TFLOP/s\n", prop.name,
              prop.multiProcessorCount, resident_blocks * threads / 32);
  for (int warps_per_sm : {4, 8, 16}) {
    const int blocks = prop.multiProcessorCount * warps_per_sm / (threads / 32);
    mma_loop<<<blocks, threads>>>(iterations, sink);  // warm-up
    std::vector<float> ms;
    for (int r = 0; r < 10; ++r) {
      cudaEventRecord(start);
      mma_loop<<<blocks, threads>>>(iterations, sink);
      cudaEventRecord(stop);
      cudaEventSynchronize(stop);
      float t = 0.f;
      cudaEventElapsedTime(&t, start, stop);
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    const double flops = 2.0 * 16 * 8 * 16 * chains * double(iterations) * blocks * (threads / 32);
    std::printf("%8d  %7.1f\n", warps_per_sm, flops / (ms[5] * 1e-3) / 1e12);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::printf("error: %s\n", cudaGetErrorString(err));
    return 1;
  }
  return 0;
}
