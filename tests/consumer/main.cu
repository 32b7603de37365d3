// Compiled by nvcc: the same headers in a CUDA translation unit, with a kernel that uses them on the device. It and
// second_unit.cu include all of cce: the program links only if every kernel and function the headers define may be
// defined in several translation units of one program.
#include <cuda_runtime.h>

#include <cce/cce.cuh>

#include <cstdio>

const char* second_unit_status();

__global__ void read_options(cce::options opts, float* out) { *out = opts.temperature; }

int main() {
  cce::problem<float> p;
  p.n = 8;

  int devices = 0;  // no device is fine: this only checks that the program builds and links
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;

  std::printf("consumer_cuda: %s, N=%lld, %d device(s)\n", second_unit_status(),
              static_cast<long long>(p.n), devices);
  return 0;
}
