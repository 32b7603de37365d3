// Compiled by nvcc: the same headers in a CUDA translation unit, with a kernel that uses them on the device.
#include <cuda_runtime.h>

#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>

#include <cstdio>

__global__ void read_options(cce::options opts, float* out) { *out = opts.temperature; }

int main() {
  cce::problem<float> p;
  p.n = 8;

  int devices = 0;  // no device is fine: this only checks that the program builds and links
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;

  std::printf("consumer_cuda: %s, N=%lld, %d device(s)\n", cce::to_string(cce::status::success),
              static_cast<long long>(p.n), devices);
  return 0;
}
