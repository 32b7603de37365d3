// Whether ptxas lets an epilogue run under the next tile's wgmma: a consumer warpgroup issues a tile's products
// (m64n128k16, asynchronous) and, before waiting for them, folds the previous tile's 64 logits per thread. Where the
// folded values were themselves written by a wgmma (two accumulator sets taking turns, `turns`), ptxas cannot tell
// that the last wait covered them and injects a warpgroup wait of its own before their first use, which holds the
// fold until the products in flight are done; where they are a copy taken after the wait (`copied`), it injects none
// and spreads the fold between the wgmma issues. `pieces` has the kernels' shape: a tile's products in a loop over
// k-blocks, each waiting for its stage, and the copy's fold in four pieces placed after the first four k-blocks'
// products, each before the wait that lets one k-block's products stay in flight. Compile only:
//
//   nvcc --generate-code=arch=compute_90a,code=sm_90a -O3 -Xptxas -v -I include -c bench/tune/wgmma_overlap_probe.cu \
//     -o probe.o
//
// `turns` draws "(C7517) warpgroup.wait is injected ... to allow use of registers defined by GMMA", `copied` and
// `pieces` nothing; `cuobjdump -sass probe.o` then shows each kernel's WARPGROUP.DEPBAR among the HGMMA and MUFU.EX2
// instructions (in `pieces`: 4 HGMMA, 16 MUFU.EX2, a wait for all but the last group, per k-block). A forward built
// in `pieces`' shape drew no injected wait either, and ran 31-48 % slower than the shipped one (docs/performance.md).
#include <cstdint>

#include <cce/kernel/portable/fast_math.cuh>
#include <cce/kernel/sm90/wgmma.cuh>

namespace {

using cce::detail::exp2_approx;
using cce::detail::sm90::commit_group;
using cce::detail::sm90::fence;
using cce::detail::sm90::wait_group;

constexpr int k_steps = 4;  // k16 steps per call of products(): a tile's, or a k-block's in `pieces`

// d += A(64 x 16) B(128 x 16)^T, both K-major bf16 in shared memory (descriptors as given).
__device__ __forceinline__ void mma(float (&d)[64], std::uint64_t a, std::uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
      "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, "
      "0, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b));
}

__device__ __forceinline__ void products(float (&d)[64], std::uint64_t a, std::uint64_t b) {
  fence();
#pragma unroll
  for (int k = 0; k < k_steps; ++k) mma(d, a + 2 * k, b + 2 * k);
  commit_group();
}

// A softmax-like fold of Count logits from z[first]: one FFMA, one ex2 and one add each (first a constant once
// unrolled).
template <int Count = 64>
__device__ __forceinline__ float fold(const float (&z)[64], float shift, int first = 0) {
  float s[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < Count; ++i) {
    s[i % 2] += exp2_approx(fmaf(z[first + i], 1.4426950f, -shift));
  }
  return s[0] + s[1];
}

// Spins until a stage's flag shows the tile's phase (the kernels wait on an mbarrier).
__device__ __forceinline__ void stage_wait(const unsigned* flag, unsigned phase) {
  while (*static_cast<const volatile unsigned*>(flag) != phase) {
  }
}

}  // namespace

// Two accumulator sets taking turns: each folds the tile the other's products follow.
__global__ void __launch_bounds__(128, 1) turns(float* out, std::uint64_t a, std::uint64_t b, int tiles) {
  float x[64], y[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) x[i] = y[i] = 0.f;
  float total = 0.f;
  for (int t = 0; t < tiles; t += 2) {
    products(y, a, b);
    total += fold(x, float(t));
    wait_group<0>();
    products(x, a, b);
    total += fold(y, float(t + 1));
    wait_group<0>();
  }
  out[threadIdx.x] = total;
}

// One accumulator set and a copy of the last tile, taken after its wait: the fold reads the copy.
__global__ void __launch_bounds__(128, 1) copied(float* out, std::uint64_t a, std::uint64_t b, int tiles) {
  float acc[64], last[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = last[i] = 0.f;
  float total = 0.f;
  for (int t = 0; t < tiles; ++t) {
    products(acc, a, b);
    total += fold(last, float(t));
    wait_group<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("mov.b32 %0, %1;" : "=f"(last[i]) : "f"(acc[i]));
  }
  out[threadIdx.x] = total;
}

// As in the kernels: a tile's products in a loop over k-blocks, each waiting for its stage; the last tile's copy
// folded in four pieces, one after each of the first four k-blocks' products.
__global__ void __launch_bounds__(128, 1)
    pieces(float* out, const unsigned* flags, std::uint64_t a, std::uint64_t b, int tiles, int kblocks) {
  float acc[64], last[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = last[i] = 0.f;
  float total = 0.f;
  for (int t = 0; t < tiles; ++t) {
    for (int kb = 0; kb < kblocks; kb += 4) {
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        if (kb + p < kblocks) {
          stage_wait(flags + kb + p, unsigned(t));
          products(acc, a + kb + p, b);
          if (kb == 0) total += fold<16>(last, float(t), 16 * p);
          wait_group<1>();
        }
      }
    }
    wait_group<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("mov.b32 %0, %1;" : "=f"(last[i]) : "f"(acc[i]));
  }
  out[threadIdx.x] = total;
}
