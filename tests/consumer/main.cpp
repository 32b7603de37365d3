// Compiled by the host compiler: cce's plain host headers and the CUDA headers they pair with need no nvcc.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cce/config.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>

#include <cstdio>

int main() {
  const cce::options opts = cce::options::exact();
  cce::problem<__nv_bfloat16> p;
  p.n = 8;
  p.d = 16;
  p.v = 32;

  int runtime = 0;  // links the CUDA runtime; needs no device
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) return 1;

  std::printf("consumer_host: cce %d.%d.%d, CUDA runtime %d, %s, N=%lld, deterministic=%d\n", CCE_VERSION_MAJOR,
              CCE_VERSION_MINOR, CCE_VERSION_PATCH, runtime, cce::to_string(cce::status::success),
              static_cast<long long>(p.n), static_cast<int>(opts.deterministic));
  return 0;
}
