// One tuning candidate: times cce with the tile policy whose parameters tune.py gives on the compiler's command line
// (CCE_TUNE_POLICY_PARAMS: bm/bn/bk/stages/warps_m/warps_n/min_blocks/forward_ctas_per_sm, separated by `/`, because
// nvcc splits option values at commas) on one shape of benchmark data, next to a cuBLAS GEMM of the same
// N x D x V in the same process.
//
//   candidate N D V SOFTCAP REGIME ITERATIONS [portable]     (REGIME: 0 peaked, 1 lm-like, 2 uniform)
//
// `portable` pins the portable (sm_80) kernels, on any GPU. CCE_TUNE_BACKWARD in the environment picks the backward:
// `chunked` (the default, 256 MiB), `minimal` (64 MiB) or `loss_and_grad` (1 GiB, keeping logits where it can, in
// place of the forward + backward).
// Prints one JSON object: the medians in milliseconds of the GEMM, the forward and the forward + backward, and the
// workspace of the latter. Element type: CCE_TUNE_TYPE (default __nv_bfloat16).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cce/cce.cuh>

#include "../bench_data.cuh"
#include "../event_timing.cuh"

#ifndef CCE_TUNE_TYPE
#define CCE_TUNE_TYPE __nv_bfloat16
#endif

namespace {

using namespace cce_bench;
using T = CCE_TUNE_TYPE;

// "a/b/c/..." as the integers a, b, c, ...
#define CCE_STRINGIFY_(x) #x
#define CCE_STRINGIFY(x) CCE_STRINGIFY_(x)
#ifdef CCE_TUNE_POLICY_PARAMS
constexpr int param(int i) {
  const char* s = CCE_STRINGIFY(CCE_TUNE_POLICY_PARAMS);
  while (i > 0) i -= *s++ == '/';
  int v = 0;
  for (; *s >= '0' && *s <= '9'; ++s) v = 10 * v + (*s - '0');
  return v;
}
using policy = cce::tile::policy<param(0), param(1), param(2), param(3), param(4), param(5), param(6), param(7)>;
#else
using policy = cce::tile::default_policy_t<T>;
#endif

void check(cce::status s) {
  if (s != cce::status::success) {
    std::fprintf(stderr, "cce: %s\n", cce::to_string(s));
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool portable = argc == 8 && std::string(argv[7]) == "portable";
  if (argc != 7 && !portable) {
    std::fprintf(stderr, "usage: %s N D V SOFTCAP REGIME ITERATIONS [portable]\n", argv[0]);
    return 2;
  }
  const shape s{"tune", std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), float(std::atof(argv[4]))};
  const int regime = std::atoi(argv[5]), iterations = std::atoi(argv[6]);
  inputs<T> in(s, regime);

  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 1;
  device_buffer<T> logits(std::size_t(s.n * s.v));
  const cudaDataType_t type = std::is_same_v<T, __half> ? CUDA_R_16F : CUDA_R_16BF;
  const float one = 1.f, zero = 0.f;
  const double gemm_ms = median_ms(iterations, [&] {  // logits^T (V x N, column-major) = C E^T
    cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(s.v), int(s.n), int(s.d), &one, in.c.ptr, type, int(s.d), in.e.ptr,
                 type, int(s.d), &zero, logits.ptr, type, int(s.v), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  });
  cublasDestroy(h);

  const char* backward_env = std::getenv("CCE_TUNE_BACKWARD");
  const std::string backward = backward_env ? backward_env : "chunked";
  const bool loss_and_grad = backward == "loss_and_grad", minimal = backward == "minimal";
  cce::options o;
  o.softcap = s.softcap;
  o.backward_mode = loss_and_grad ? cce::backward_mode::loss_and_grad
                    : minimal     ? cce::backward_mode::minimal
                                  : cce::backward_mode::chunked;
  o.hopper_kernels = !portable;
  cce::linear_cross_entropy<T, policy> op{o};
  cce::problem<T> p;
  p.n = s.n;
  p.d = s.d;
  p.v = s.v;
  p.e = in.e.ptr;
  p.c = in.c.ptr;
  p.targets = in.y.ptr;
  cce::device_info dev;
  check(cce::current_device(dev));
  const std::size_t budget = std::size_t(loss_and_grad ? 1024 : minimal ? 64 : 256) << 20;
  const std::size_t saved_bytes = op.saved_bytes(p), ws_bytes = op.workspace_bytes(p, dev, budget);
  device_buffer<char> saved(saved_bytes), ws(ws_bytes);
  device_buffer<float> loss(1);
  device_buffer<T> de(std::size_t(s.n * s.d)), dc(std::size_t(s.v * s.d));
  cce::forward_outputs out;
  out.loss = loss.ptr;
  cce::gradients<T> g;
  g.de = de.ptr;
  g.dc = dc.ptr;
  const double fw_ms =
      median_ms(iterations, [&] { check(op.forward(p, out, saved.ptr, saved_bytes, ws.ptr, ws_bytes)); });
  const double fwbw_ms = median_ms(iterations, [&] {
    if (loss_and_grad) {
      check(op.loss_and_grad(p, out, g, saved.ptr, saved_bytes, ws.ptr, ws_bytes));
      return;
    }
    check(op.forward(p, out, saved.ptr, saved_bytes, ws.ptr, ws_bytes));
    check(op.backward(p, {}, g, saved.ptr, saved_bytes, ws.ptr, ws_bytes));
  });
  std::printf("{\"gemm_ms\": %.4f, \"fw_ms\": %.4f, \"fwbw_ms\": %.4f, \"extra_bytes\": %zu}\n", gemm_ms, fw_ms,
              fwbw_ms, saved_bytes + ws_bytes);
  return 0;
}
