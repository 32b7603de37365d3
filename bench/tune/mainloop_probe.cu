// The portable mainloop's rate on its own: the logit product E·Cᵀ of one shape through the library's tile product
// (mainloop.cuh) at several tile policies, with the forward's grid (row tiles x vocabulary splits, each CTA walking its
// run of vocabulary tiles) and either no epilogue or the forward's per-row (max, Σexp) statistics in registers; next
// to a cuBLAS GEMM of the same N x D x V on the same buffers, in one process, candidates interleaved over rounds.
// Policies at one CTA per SM run the fragment-prefetching pipeline (mma_mainloop::prefetch_fragments).
//
//   nvcc -std=c++17 -O3 --generate-code=arch=compute_90a,code=sm_90a -I include -Xptxas -v \
//        bench/tune/mainloop_probe.cu -lcublas -o mainloop_probe
//   mainloop_probe N D V ROUNDS ITERATIONS [CANDIDATE]
//
// Prints one line per candidate and round: median milliseconds of ITERATIONS launches, TFLOP/s, ratio to the GEMM.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cce/kernel/portable/fast_math.cuh>
#include <cce/kernel/portable/mainloop.cuh>
#include <cce/tile/default_policy.hpp>

#include "../bench_data.cuh"
#include "../event_timing.cuh"

namespace {

using namespace cce_bench;
using namespace cce::detail;
using T = __nv_bfloat16;

template <class Policy, bool Statistics>
__global__ void __launch_bounds__(Policy::threads, Policy::min_blocks)
    product_kernel(operand<T> e, operand<T> c, std::int64_t col_tiles, std::int64_t splits, float* sink) {
  using mainloop = mma_mainloop<T, Policy, major::k, major::k>;
  using layout = typename mainloop::fragment_layout;
  extern __shared__ __align__(16) unsigned char smem[];
  const std::int64_t row0 = std::int64_t(blockIdx.x) * Policy::bm;
  const std::int64_t ct_begin = col_tiles * blockIdx.y / splits, ct_end = col_tiles * (blockIdx.y + 1) / splits;
  float m[layout::row_slots], s[layout::row_slots];
#pragma unroll
  for (int r = 0; r < layout::row_slots; ++r) m[r] = -1e30f, s[r] = 0.f;
  for (std::int64_t ct = ct_begin; ct < ct_end; ++ct) {
    typename mainloop::accumulators acc;
    mainloop::clear(acc);
    mainloop::template run<true>(acc, smem, e, row0, c, ct * Policy::bn, 0, e.depth);
#pragma unroll
    for (int r = 0; r < layout::row_slots; ++r) {
      if constexpr (Statistics) {  // the forward's per-slot online softmax, in registers
        float tm = m[r];
#pragma unroll
        for (int q = 0; q < layout::cols; ++q) tm = fmaxf(tm, layout::at(acc, r, q));
        float sum = s[r] * exp2_approx((m[r] - tm) * log2e);
#pragma unroll
        for (int q = 0; q < layout::cols; ++q) sum += exp2_approx((layout::at(acc, r, q) - tm) * log2e);
        m[r] = tm;
        s[r] = sum;
      } else {
#pragma unroll
        for (int q = 0; q < layout::cols; ++q) s[r] += layout::at(acc, r, q);
      }
    }
  }
  float total = 0.f;
#pragma unroll
  for (int r = 0; r < layout::row_slots; ++r) total += s[r] + m[r];
  if (total == 1234.5f) *sink = total;  // keeps the products alive
}

struct candidate {
  const char* name;
  void (*launch)(const operand<T>&, const operand<T>&, std::int64_t n, std::int64_t v, float*);
};

template <class Policy, bool Statistics>
candidate make(const char* name) {
  return {name, [](const operand<T>& e, const operand<T>& c, std::int64_t n, std::int64_t v, float* sink) {
            constexpr std::size_t smem = mma_mainloop<T, Policy, major::k, major::k>::smem_bytes;
            auto kernel = product_kernel<Policy, Statistics>;
            static bool configured = false;
            if (!configured) {
              CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
              configured = true;
            }
            const std::int64_t row_tiles = (n + Policy::bm - 1) / Policy::bm, col_tiles = v / Policy::bn;
            // As the forward: about 16 CTAs per SM over the vocabulary splits.
            const std::int64_t splits = std::min<std::int64_t>(col_tiles, (132 * 16 + row_tiles - 1) / row_tiles);
            kernel<<<dim3(unsigned(row_tiles), unsigned(splits)), Policy::threads, smem>>>(e, c, col_tiles, splits,
                                                                                           sink);
          }};
}

using cce::tile::policy;
using narrow = cce::tile::default_policy_t<T>;   // 2 CTAs per SM, 32 x 64 warp tiles
using wide = wide_policy<narrow>;                // 1 CTA per SM, 64 x 64 warp tiles: the forward's
using wide4 = policy<128, 256, 64, 4, 2, 4, 1>;  // the same with 4 stages (192 KiB)
using tall = policy<256, 128, 64, 3, 4, 2, 1>;   // 1 CTA per SM, 64 x 64 warp tiles

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    std::fprintf(stderr, "usage: %s N D V ROUNDS ITERATIONS [CANDIDATE]\n", argv[0]);
    return 2;
  }
  const shape s{"probe", std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), 0.f};
  const int rounds = std::atoi(argv[4]), iterations = std::atoi(argv[5]);
  inputs<T> in(s, 1);
  device_buffer<T> logits(std::size_t(s.n * s.v));
  device_buffer<float> sink(1);
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 1;
  const float one = 1.f, zero = 0.f;
  const operand<T> e{in.e.ptr, s.d, s.n, s.d}, c{in.c.ptr, s.d, s.v, s.d};

  const candidate candidates[] = {
      make<narrow, false>("narrow"),  make<wide, false>("wide"),          make<wide4, false>("wide4"),
      make<tall, false>("tall"),      make<narrow, true>("narrow+stats"), make<wide, true>("wide+stats"),
      make<tall, true>("tall+stats"),
  };
  const char* only = argc == 7 ? argv[6] : nullptr;
  const double flop = 2.0 * double(s.n) * double(s.d) * double(s.v);
  for (int r = 0; r < rounds; ++r) {
    const double gemm = median_ms(iterations, [&] {
      cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(s.v), int(s.n), int(s.d), &one, in.c.ptr, CUDA_R_16BF, int(s.d),
                   in.e.ptr, CUDA_R_16BF, int(s.d), &zero, logits.ptr, CUDA_R_16BF, int(s.v), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT);
    });
    std::printf("round %d gemm %.3f ms %.0f TFLOP/s\n", r, gemm, flop / gemm * 1e-9);
    for (const candidate& k : candidates) {
      if (only && std::string(only) != k.name) continue;
      const double ms = median_ms(iterations, [&] { k.launch(e, c, s.n, s.v, sink.ptr); });
      std::printf("round %d %-24s %.3f ms %.0f TFLOP/s %.2f x GEMM\n", r, k.name, ms, flop / ms * 1e-9, ms / gemm);
    }
    std::fflush(stdout);
  }
  cublasDestroy(h);
  return 0;
}
