// Catch2's runner for the GPU tests. Without a visible CUDA device it runs nothing and exits with 77, which the
// tests are registered to report as skipped, so the GPU tests build and "pass" on machines without a GPU.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>

namespace {
constexpr int kSkipReturnCode = 77;  // SKIP_RETURN_CODE in tests/CMakeLists.txt
}

int main(int argc, char* argv[]) {
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("No CUDA device visible (%s): GPU tests skipped.\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0");
    return kSkipReturnCode;
  }
  return Catch::Session().run(argc, argv);
}
