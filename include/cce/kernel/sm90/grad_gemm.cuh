// Hopper backward step 2 (sm_90a): the gradient products of kernel/portable/grad_gemm.cuh, same parameters and
// epilogue, on the tile engine of logit_tile.cuh:
//   dE_block = dZ C_chunk     A = dZ K-major (rows x classes),    B = C_chunk MN-major (D contiguous)
//   dC_chunk = dZ^T E_block   A = dZ MN-major (classes contiguous), B = E_block MN-major
// Each CTA owns a 128 x 256 output tile (128 rows or classes by 256 of D). k-blocks whose dZ tile the filter skipped
// are neither loaded nor multiplied. CTAs run in groups of 8 output-row tiles that sweep every column tile, so that
// a group's A tiles are read from L2 by all of its column tiles.
#pragma once

#include <cstdint>

#include <cce/detail/math.hpp>
#include <cce/kernel/portable/grad_gemm.cuh>
#include <cce/kernel/sm90/logit_tile.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail::sm90 {

using grad_gemm_shape = logit_tile_shape;
// Row pitch of the staged fp32 output tile: 4 floats of padding make the fragment writes conflict-free.
inline constexpr int staging_ld = grad_gemm_shape::bn + 4;
static_assert(std::size_t(grad_gemm_shape::bm) * staging_ld * sizeof(float) <=
                  std::size_t(grad_gemm_shape::stages) *
                      (grad_gemm_shape::a_bytes<__half> + grad_gemm_shape::b_bytes<__half>),
              "the staged tile fits in the ring");

template <class T, class G>
struct grad_gemm_params_sm90 {
  operand_maps maps;
  grad_gemm_params<T, G, grad_gemm_shape::filter_bn> base;
  int m_tiles = 0, n_tiles = 0;
};

template <class T, class G, major MajorA>
__global__ void __launch_bounds__(grad_gemm_shape::threads, 1)
    grad_gemm_kernel(const __grid_constant__ grad_gemm_params_sm90<T, G> prm) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = grad_gemm_shape;
  // Only the sm_90a image has this body (and static shared memory: the host checks for it, dispatch/sm90.cuh).
  extern __shared__ unsigned char smem_raw[];
  __shared__ stage_barriers<S::stages> bars;

  const auto& p = prm.base;
  const tile::grouped_order<8> pos(int(blockIdx.x), prm.m_tiles, prm.n_tiles);
  active_k_tiles<S::filter_bn> active = p.active;
  active.fixed_tile = pos.m;
  const auto live = [&](int kb) { return active(std::int64_t(kb) * S::bk); };  // 2 k-blocks per filter tile
  const int k_blocks = int(ceil_div(p.k, std::int64_t(S::bk)));

  if (threadIdx.x == 0) bars.init(S::consumer_warps);
  __syncthreads();
  const tile_ring<T, MajorA, major::mn> ring(smem_raw, bars);

  if (threadIdx.x / 128 == 0) {  // producer
    shrink_registers<S::producer_registers>();
    if (threadIdx.x == 0) {
      ring_position<S::stages> at;
      ring.load_tile(at, &prm.maps, pos.m * S::bm, pos.n * S::bn, k_blocks, live);
    }
    return;
  }

  grow_registers<S::consumer_registers>();
  const int cw = threadIdx.x / 32 - 4;  // consumer warp
  const int lane = threadIdx.x % 32;
  float acc[128];
  ring_position<S::stages> at;
  ring.compute_tile(acc, at, k_blocks, cw / 4, live);

  // The epilogue goes through shared memory (the ring's buffers, free once both warpgroups are done with them), so
  // that it runs as a short loop of coalesced 4-column runs rather than 128 scattered elements per thread.
  consumer_barrier();
  float* staged = ring.staging_area();
  const int wrow = (cw / 4) * 64 + (cw % 4) * 16 + lane / 4, wcol = 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < 32; ++j)
      *reinterpret_cast<float2*>(staged + (wrow + 8 * r) * staging_ld + 8 * j + wcol) =
          make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
  consumer_barrier();

  // 256 threads: 64 runs of 4 columns per row, 4 rows per pass, the loads of `batch` passes ahead of their stores.
  constexpr int row_step = S::consumer_warps * 32 / 64, batch = 8;
  const int t = threadIdx.x - 128, col = 4 * (t % 64);
  const std::int64_t row0 = std::int64_t(pos.m) * S::bm, col0 = std::int64_t(pos.n) * S::bn + col;
  if (col0 >= p.n) return;
  const int rows = int(p.m - row0 < S::bm ? p.m - row0 : S::bm);
#pragma unroll 1
  for (int r0 = t / 64; r0 < rows; r0 += batch * row_step) {
    gradient_run<4, G> run[batch];
#pragma unroll
    for (int b = 0; b < batch; ++b)
      if (r0 + b * row_step < rows) run[b].load(p, row0 + r0 + b * row_step, col0);
#pragma unroll
    for (int b = 0; b < batch; ++b) {
      const int r = r0 + b * row_step;
      if (r >= rows) break;
      const float4 v = *reinterpret_cast<const float4*>(staged + r * staging_ld + col);
      const float x[4] = {v.x, v.y, v.z, v.w};
      run[b].store(p, row0 + r, col0, x);
    }
  }
#endif
}

}  // namespace cce::detail::sm90
