// The logit-tile engine the Hopper kernels share: a CTA of one producer warpgroup and two consumer warpgroups
// computes 128 x 256 tiles of E C^T. The producer streams 128-row E boxes and 256-row C boxes, 64 deep, through a
// 4-stage ring with TMA; each consumer warpgroup multiplies its 64 rows by the 256 classes on wgmma (m64n256k16,
// fp32 accumulators in registers, wgmma.cuh gives their layout) and hands each stage back as soon as its products
// are done. Kernels differ only in which tiles they visit and in their epilogues.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>

#include <cce/epilogue/logit_terms.hpp>
#include <cce/kernel/portable/ptx.cuh>
#include <cce/kernel/sm90/pipeline.cuh>
#include <cce/kernel/sm90/tma.cuh>
#include <cce/kernel/sm90/wgmma.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail::sm90 {

struct logit_tile_shape {
  static constexpr int bm = 128;  // rows per CTA: 64 per consumer warpgroup
  static constexpr int bn = 256;  // classes per tile (the wgmma N)
  static constexpr int bk = swizzle_depth;
  static constexpr int stages = 4;
  static constexpr int consumers = 2;
  static constexpr int threads = 128 * (1 + consumers);
  static constexpr int consumer_warps = 4 * consumers;
  static constexpr int filter_bn = 128;  // the tile width of the gradient filter (plan grid)
  static constexpr int producer_registers = 40, consumer_registers = 232;

  template <class T>
  static constexpr std::uint32_t a_bytes = bm* bk * sizeof(T);
  template <class T>
  static constexpr std::uint32_t b_bytes = bn* bk * sizeof(T);
  template <class T>
  static constexpr std::size_t smem_bytes = std::size_t(stages) * (a_bytes<T> + b_bytes<T>)+1024;  // + alignment
};

// Operand maps of a logit-tile kernel: E in boxes of 128 rows, C in boxes of 256 rows, 64 deep.
struct logit_tile_maps {
  CUtensorMap e;
  CUtensorMap c;
};

template <class T>
class logit_tile_ring {
  using S = logit_tile_shape;
  static constexpr std::uint32_t a_bytes = S::a_bytes<T>, b_bytes = S::b_bytes<T>;

 public:
  // The 128-byte swizzle repeats every 1024 bytes: stage buffers start on that boundary.
  __device__ logit_tile_ring(unsigned char* smem_raw, stage_barriers<S::stages>& bars)
      : bars_(bars),
        sa_((ptx::smem_addr(smem_raw) + 1023u) & ~1023u),
        sb_(sa_ + S::stages * a_bytes),
        smem_(smem_raw + (sa_ - ptx::smem_addr(smem_raw))) {}

  // Producer (one thread): the k-blocks of tile (row0, col0).
  __device__ __forceinline__ void load_tile(ring_position<S::stages>& at, const logit_tile_maps* maps, int row0,
                                            int col0, int k_blocks) const {
    for (int kb = 0; kb < k_blocks; ++kb) {
      acquire_for_write(bars_, at, a_bytes + b_bytes);
      tma_load_2d(smem_ + at.stage * a_bytes, &maps->e, kb * S::bk, row0, &bars_.full[at.stage]);
      tma_load_2d(smem_ + S::stages * a_bytes + at.stage * b_bytes, &maps->c, kb * S::bk, col0, &bars_.full[at.stage]);
      at.advance();
    }
  }

  // Consumer warpgroup `wg` (0 or 1): acc = its 64 rows x 256 classes of the next tile in the ring.
  __device__ __forceinline__ void compute_tile(float (&acc)[128], ring_position<S::stages>& at, int k_blocks,
                                               int wg) const {
    const std::uint32_t a_rows = sa_ + std::uint32_t(wg) * 64 * 128;  // 64 rows of 128 bytes
    int previous = 0;
#pragma unroll 1
    for (int kb = 0; kb < k_blocks; ++kb) {
      wait_parity(&bars_.full[at.stage], at.phase);
      fence();
#pragma unroll
      for (int k = 0; k < S::bk / 16; ++k) {
        mma_m64n256k16<T>(acc, k_major_sw128_descriptor(a_rows + at.stage * a_bytes + k * 32),
                          k_major_sw128_descriptor(sb_ + at.stage * b_bytes + k * 32), kb > 0 || k > 0);
      }
      commit_group();
      wait_group<1>();  // the previous stage's products are done: hand its buffers back
      if (kb > 0) release(bars_, previous);
      previous = at.stage;
      at.advance();
    }
    wait_group<0>();
    release(bars_, previous);
#pragma unroll
    for (int i = 0; i < 128; ++i) fence_operand(acc[i]);
  }

 private:
  stage_barriers<S::stages>& bars_;
  std::uint32_t sa_, sb_;
  unsigned char* smem_;
};

// Encodes the maps of E (rows x depth) and C (classes x depth) for T; false when TMA cannot address them.
template <class T>
bool encode_logit_tile_maps(logit_tile_maps& maps, const T* e, std::int64_t rows, std::int64_t lde, const T* c,
                            std::int64_t classes, std::int64_t ldc, std::int64_t depth) {
  const CUtensorMapDataType type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode_k_major_sw128(&maps.e, e, rows, depth, lde, type, sizeof(T), logit_tile_shape::bm) &&
         encode_k_major_sw128(&maps.c, c, classes, depth, ldc, type, sizeof(T), logit_tile_shape::bn);
}

// 2^x on the special-function unit (relative error ~2^-22); the epilogues fold log2(e) into an FMA.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// z = softcap(raw) / T over a whole accumulator tile, in straight-line code: tanh(y) = sign(y) (1 - e) / (1 + e)
// with e = 2^(-2 log2(e) |y|) from one ex2 and one approximate division per logit (absolute error ~1e-7, against
// ~1 ulp for tanhf at many times the instructions, which also overflow the instruction cache once unrolled).
__device__ __forceinline__ void transform_logits(float (&acc)[128], const logit_transform& t) {
  if (t.softcap > 0.f) {
    const float scale = t.softcap * t.inv_temperature, k = -2.f * log2e / t.softcap;
#pragma unroll
    for (int i = 0; i < 128; ++i) {
      const float e = exp2_approx(k * fabsf(acc[i]));
      acc[i] = copysignf(scale * __fdividef(1.f - e, 1.f + e), acc[i]);
    }
  } else if (t.inv_temperature != 1.f) {
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] *= t.inv_temperature;
  }
}

// raw = acc + bias + low-rank terms for a thread's two row slots (rows `row` and `row + 8`, columns from `col`),
// where the row and column exist.
template <class T>
__device__ __forceinline__ void add_raw_terms(float (&acc)[128], const logit_terms<T>& terms, std::int64_t row,
                                              std::int64_t col, const tile::tile_grid& g) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= g.rows) continue;
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (col + 8 * j + e < g.cols)
          acc[4 * j + 2 * r + e] = terms.raw(acc[4 * j + 2 * r + e], row + 8 * r, col + 8 * j + e);
  }
}

// dz/draw from z (logit_transform::derivative_from_logit) without a branch: (1 - c z^2) / T with c = 0 without
// softcap, and exactly 0 where the softcap saturates (|z| = k / T, as transform_logits produces it), so that an
// infinite input meets a zero gradient as it does in the reference.
struct logit_derivative {
  float c = 0.f, inv_temperature = 1.f, saturated = detail::inf_f();
  __device__ explicit logit_derivative(const logit_transform& t) : inv_temperature(t.inv_temperature) {
    if (t.softcap > 0.f) {
      saturated = t.softcap * t.inv_temperature;
      c = 1.f / (saturated * saturated);
    }
  }
  __device__ __forceinline__ float operator()(float z) const {
    return fabsf(z) >= saturated ? 0.f : fmaf(-c * z, z, 1.f) * inv_temperature;
  }
};

// Consumer warpgroups only: a barrier that leaves the producer out.
__device__ __forceinline__ void consumer_barrier() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(logit_tile_shape::consumer_warps * 32) : "memory");
}

}  // namespace cce::detail::sm90
