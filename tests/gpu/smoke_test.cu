// The GPU toolchain end to end: a kernel compiled for the configured architectures launches and writes its result.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <vector>

#include <cce/options.hpp>

namespace {

__global__ void scale_by_temperature(cce::options opts, const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i] / opts.temperature;
}

}  // namespace

TEST_CASE("a kernel launches and returns its result", "[gpu]") {
  constexpr int n = 1000;
  std::vector<float> host(n);
  for (int i = 0; i < n; ++i) host[i] = float(i);

  float *in = nullptr, *out = nullptr;
  REQUIRE(cudaMalloc(&in, n * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(&out, n * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMemcpy(in, host.data(), n * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);

  cce::options opts;
  opts.temperature = 2.f;
  scale_by_temperature<<<(n + 255) / 256, 256>>>(opts, in, out, n);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  REQUIRE(cudaMemcpy(host.data(), out, n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  cudaFree(in);
  cudaFree(out);

  for (int i = 0; i < n; ++i) REQUIRE(host[i] == float(i) / 2.f);
}
