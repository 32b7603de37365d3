// The tile engine the Hopper kernels share: a CTA of one producer warpgroup and two consumer warpgroups computes
// 128 x 256 tiles of a product A B^T (E C^T for the logits, dZ C and dZ^T E for the gradients). The producer streams
// A and B with TMA through a ring of 64-deep stages (4 unless a kernel asks for fewer); each consumer warpgroup
// multiplies its 64 rows of A by the 256 rows of B on wgmma (m64n256k16, fp32 accumulators in registers, wgmma.cuh
// gives their layout) and hands each stage back as soon as its products are done. Operands are K-major (E, C in the
// logits; dZ in dE) or MN-major (C and E as right-hand sides, dZ^T); k-blocks a cursor passes over (the gradient
// filter's dead tiles) are neither loaded nor computed. Kernels differ only in which tiles they visit and in their
// epilogues. When the CTAs of a cluster share their B tiles (cluster.cuh), each copies one part of every B stage and
// multicasts it to all of them; a stage is then free once the consumers of every CTA of the cluster are done with it.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cce/epilogue/logit_terms.hpp>
#include <cce/kernel/portable/fast_math.cuh>
#include <cce/kernel/portable/operand.cuh>
#include <cce/kernel/portable/ptx.cuh>
#include <cce/kernel/sm90/cluster.cuh>
#include <cce/kernel/sm90/pipeline.cuh>
#include <cce/kernel/sm90/tma.cuh>
#include <cce/kernel/sm90/wgmma.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail::sm90 {

struct logit_tile_shape {
  static constexpr int bm = 128;  // rows of A per CTA: 64 per consumer warpgroup
  static constexpr int bn = 256;  // rows of B per tile (the wgmma N)
  static constexpr int bk = swizzle_depth;
  static constexpr int stages = 4;
  static constexpr int consumers = 2;
  static constexpr int threads = 128 * (1 + consumers);
  static constexpr int consumer_warps = 4 * consumers;
  static constexpr int filter_bn = 128;  // the tile width of the gradient filter (plan grid)
  // Registers per thread: what the launch gives every thread (__launch_bounds__(threads, 1)), then each role's budget
  // after setmaxnreg, which can only hand out what the producer gave up: a larger ask waits forever.
  static constexpr int launch_registers = 64 * 1024 / threads / 8 * 8;
  static constexpr int producer_registers = 40, consumer_registers = 232;
  static_assert(128 * producer_registers + 128 * consumers * consumer_registers <= threads * launch_registers,
                "the registers the CTA starts with");

  template <class T>
  static constexpr std::uint32_t a_bytes = bm* bk * sizeof(T);
  template <class T>
  static constexpr std::uint32_t b_bytes = bn* bk * sizeof(T);
  template <class T>
  static constexpr std::size_t smem_bytes = std::size_t(stages) * (a_bytes<T> + b_bytes<T>)+1024;  // + alignment

  // Row tiles (bm x depth elements of E each) that the CTAs running at once should share (tile::l2_row_group).
  static __host__ __device__ int l2_row_group(std::int64_t depth, int elem_bytes) {
    return tile::l2_row_group(std::int64_t(bm) * depth * elem_bytes);
  }
};

// Operand maps of a tile kernel. A K-major operand is copied in one box of all its rows per k-block, an MN-major one
// in boxes of 64 M/N elements (tma.cuh).
struct operand_maps {
  CUtensorMap a;
  CUtensorMap b;
};

// The k-blocks a tile multiplies, walked by a cursor: next(kb) is the first at or after kb, or the tile's k-block
// count (active_k_tiles::cursor for the gradient filter's).
struct every_k_block {
  __device__ __forceinline__ int next(int kb) const { return kb; }
};

// Where a k-block's tiles lie in the operands' maps: A's rows (or M/N elements) from a_mn at depth a_k, B's at depth
// b_k. In place: the tile's own rows from a0, both at depth kb bk; a kernel may keep them elsewhere (the compacted
// walk's slots, grad_gemm.cuh).
struct k_block_at {
  int a_mn, a_k, b_k;
};
struct in_place {
  __device__ __forceinline__ k_block_at operator()(int a0, int kb) const {
    return {a0, kb * logit_tile_shape::bk, kb * logit_tile_shape::bk};
  }
};

template <class T, major MajorA = major::k, major MajorB = major::k, int Cluster = 1,
          int Stages = logit_tile_shape::stages>
class tile_ring {
  using S = logit_tile_shape;
  static constexpr std::uint32_t a_bytes = S::a_bytes<T>, b_bytes = S::b_bytes<T>;
  static constexpr std::uint32_t row_bytes = S::bk * sizeof(T);        // one swizzled 128-byte row
  static constexpr std::uint32_t mn_box_bytes = 64 * row_bytes;        // one MN-major box: 64 M/N x 64 k
  static constexpr std::uint32_t k16_bytes_k_major = 16 * sizeof(T);   // a k16 step inside a 128-byte row
  static constexpr std::uint32_t k16_bytes_mn_major = 16 * row_bytes;  // a k16 step over 16 rows of 128 bytes
  static_assert(S::bn % (64 * Cluster) == 0, "a CTA's part of a B stage is whole MN-major boxes");

 public:
  // A B stage is copied in Cluster parts of b_part rows (K-major: the rows of B's TMA box) or M/N elements
  // (MN-major): one per CTA when the cluster shares it, all by the CTA itself otherwise.
  static constexpr int b_part = S::bn / Cluster;
  static constexpr std::uint32_t bytes = Stages * (a_bytes + b_bytes);  // from the 1024-byte aligned start

  // The 128-byte swizzle repeats every 1024 bytes: stage buffers start on that boundary. `shared`: the grid runs in
  // clusters of Cluster CTAs that share their B tiles.
  __device__ tile_ring(unsigned char* smem_raw, stage_barriers<Stages>& bars, bool shared = Cluster > 1)
      : bars_(bars),
        sa_((ptx::smem_addr(smem_raw) + 1023u) & ~1023u),
        sb_(sa_ + Stages * a_bytes),
        smem_(smem_raw + (sa_ - ptx::smem_addr(smem_raw))),
        sharers_(shared ? Cluster : 1),
        rank_(shared ? cluster_rank<Cluster>() : 0) {}

  // Arrivals that free a stage: every consumer warp of the CTAs sharing it.
  __device__ __forceinline__ std::uint32_t stage_readers() const { return S::consumer_warps * sharers_; }

  // Producer (one thread): the k-blocks `live` visits in [k_first, k_blocks) of the tile whose A rows start at a0
  // and B rows at b0 (`place` says where each k-block's tiles lie).
  template <class Cursor = every_k_block, class Place = in_place>
  __device__ __forceinline__ void load_tile(ring_position<Stages>& at, const operand_maps* maps, int a0, int b0,
                                            int k_blocks, Cursor live = {}, int k_first = 0, Place place = {}) const {
    for (int kb = live.next(k_first); kb < k_blocks; kb = live.next(kb + 1)) {
      acquire_for_write(bars_, at, a_bytes + b_bytes);
      std::uint64_t* full = &bars_.full[at.stage];
      const k_block_at where = place(a0, kb);
      load_operand<MajorA, S::bm, 1>(smem_ + at.stage * a_bytes, &maps->a, where.a_mn, where.a_k, full);
      unsigned char* b_stage = smem_ + Stages * a_bytes + at.stage * b_bytes;
      const int k = where.b_k;
      if (sharers_ > 1) {
        load_operand<MajorB, b_part, Cluster>(b_stage + rank_ * b_part * row_bytes, &maps->b, b0 + rank_ * b_part, k,
                                              full);
      } else {
#pragma unroll
        for (int part = 0; part < Cluster; ++part)
          load_operand<MajorB, b_part, 1>(b_stage + part * b_part * row_bytes, &maps->b, b0 + part * b_part, k, full);
      }
      at.advance();
    }
  }

  // Producer, after its last load_tile: returns once the consumers of the cluster have released every stage, so that
  // no peer's arrival targets this CTA after it exits.
  __device__ __forceinline__ void drain(ring_position<Stages> at) const {
    if (sharers_ > 1) {
      for (int s = 0; s < Stages; ++s, at.advance()) wait_parity(&bars_.empty[at.stage], at.phase ^ 1u);
    }
  }

  // Consumer warpgroup `wg` (0 or 1): acc = its 64 rows x 256 columns of the next tile in the ring, over the same
  // k-blocks the producer loaded (`live`, walked by every lane of the warp; zero when there are none); returns how
  // many there were.
  template <class Cursor = every_k_block>
  __device__ __forceinline__ int compute_tile(float (&acc)[128], ring_position<Stages>& at, int k_blocks, int wg,
                                              Cursor live = {}, int k_first = 0) const {
    // Zeros first and every product accumulating: a zero tile without k-blocks then needs no branch after the loop,
    // which would make the compiler keep both versions of the accumulators, in local memory (2.7 KB of spills in the
    // forward, most of them in its per-tile path).
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    int previous = -1, computed = 0;
#pragma unroll 1
    for (int kb = live.next(k_first); kb < k_blocks; kb = live.next(kb + 1)) {
      ++computed;
      wait_parity(&bars_.full[at.stage], at.phase);
      fence();
      const std::uint32_t a_stage = sa_ + at.stage * a_bytes, b_stage = sb_ + at.stage * b_bytes;
#pragma unroll
      for (int k = 0; k < S::bk / 16; ++k)
        mma_m64n256k16<T, MajorA == major::mn, MajorB == major::mn>(acc, a_descriptor(a_stage, wg, k),
                                                                    b_descriptor(b_stage, k), true);
      commit_group();
      wait_group<1>();  // the previous stage's products are done: hand its buffers back
      if (previous >= 0) release_stage(previous);
      previous = at.stage;
      at.advance();
    }
    wait_group<0>();
    if (previous >= 0) release_stage(previous);
#pragma unroll
    for (int i = 0; i < 128; ++i) fence_operand(acc[i]);
    return computed;
  }

  // The ring's memory as a scratch area for an epilogue, once every consumer is past its last compute_tile.
  __device__ __forceinline__ float* staging_area() const { return reinterpret_cast<float*>(smem_); }

 private:
  // Rows rows (K-major) or M/N elements (MN-major) from mn0, at depth k, for every CTA of a cluster of Multicast.
  template <major Major, int Rows, int Multicast>
  __device__ __forceinline__ static void load_operand(unsigned char* dst, const CUtensorMap* map, int mn0, int k,
                                                      std::uint64_t* full) {
    const auto copy = [&](unsigned char* to, int x, int y) {
      if constexpr (Multicast == 1)
        tma_load_2d(to, map, x, y, full);
      else
        tma_multicast_2d(to, map, x, y, full, std::uint16_t((1u << Multicast) - 1));
    };
    if constexpr (Major == major::k) {
      copy(dst, k, mn0);
    } else {
#pragma unroll
      for (int i = 0; i < Rows / 64; ++i) copy(dst + i * mn_box_bytes, mn0 + 64 * i, k);
    }
  }
  // A consumer warp is done with `stage`: in every CTA sharing it, lane r reporting to CTA r.
  __device__ __forceinline__ void release_stage(int stage) const {
    if (sharers_ == 1) {
      release(bars_, stage);
    } else if (threadIdx.x % 32 < Cluster) {
      arrive_in_cta(&bars_.empty[stage], int(threadIdx.x % 32));
    }
  }
  // Warpgroup wg's 64 rows of A: rows 64 wg.. of the K-major box, or the wg-th MN-major box.
  __device__ __forceinline__ static std::uint64_t a_descriptor(std::uint32_t stage, int wg, int k) {
    if constexpr (MajorA == major::k)
      return k_major_sw128_descriptor(stage + std::uint32_t(wg) * 64 * 128 + k * k16_bytes_k_major);
    else
      return mn_major_sw128_descriptor(stage + std::uint32_t(wg) * mn_box_bytes + k * k16_bytes_mn_major, mn_box_bytes);
  }
  __device__ __forceinline__ static std::uint64_t b_descriptor(std::uint32_t stage, int k) {
    if constexpr (MajorB == major::k)
      return k_major_sw128_descriptor(stage + k * k16_bytes_k_major);
    else
      return mn_major_sw128_descriptor(stage + k * k16_bytes_mn_major, mn_box_bytes);
  }

  stage_barriers<Stages>& bars_;
  std::uint32_t sa_, sb_;
  unsigned char* smem_;
  int sharers_;  // CTAs sharing each B stage: Cluster or 1
  int rank_;
};

// The tensor-map element type of T: bf16, fp16 or fp32.
template <class T>
inline constexpr CUtensorMapDataType tensor_map_type = std::is_same_v<T, float>    ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                                       : std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                                   : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;

// Encodes the map of an operand for T in `major` (rows x depth, as kernel/portable/operand.cuh describes it) with
// boxes for `rows` per tile; false when TMA cannot address it.
template <class T, major Major>
bool encode_operand_map(CUtensorMap& map, const operand<T>& g, std::uint32_t rows) {
  const CUtensorMapDataType type = tensor_map_type<T>;
  return Major == major::k ? encode_sw128(&map, g.ptr, g.depth, g.extent, g.ld, type, sizeof(T), rows)
                           : encode_sw128(&map, g.ptr, g.extent, g.depth, g.ld, type, sizeof(T), swizzle_depth);
}

// The maps of the logit product E (rows x depth) C (classes x depth)^T, both K-major, for a ring like Ring.
template <class Ring, class T>
bool encode_logit_maps(operand_maps& maps, const operand<T>& e, const operand<T>& c) {
  return encode_operand_map<T, major::k>(maps.a, e, logit_tile_shape::bm) &&
         encode_operand_map<T, major::k>(maps.b, c, Ring::b_part);
}

// z = softcap(raw) / T over a whole accumulator tile, in straight-line code (fast_math.cuh).
__device__ __forceinline__ void transform_logits(float (&acc)[128], const logit_transform& t) {
  if (t.softcap > 0.f) {
    const softcap_approx<> cap(t);  // 16-bit inputs
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = cap(acc[i]);
  } else if (t.inv_temperature != 1.f) {
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] *= t.inv_temperature;
  }
}

// Stores of an accumulator tile (wgmma.cuh's layout) in 8-byte runs: lanes l and l ^ 1 trade one column pair of
// every two n8 blocks, so that each holds 4 adjacent values and a warp's store fills whole 32-byte sectors. The even
// lane keeps block 2b (its pair, then the odd lane's), the odd lane block 2b + 1; the thread's run b starts at column
// `first + 16 b` of the tile.
struct paired_runs {
  bool odd;
  int first;
  __device__ explicit paired_runs(int lane) : odd(lane % 2 == 1), first(4 * ((lane % 4) / 2) + (odd ? 8 : 0)) {}
  // Run b's four values, from the thread's packed column pairs of blocks 2b and 2b + 1.
  __device__ __forceinline__ uint2 trade(std::uint32_t even_block, std::uint32_t odd_block) const {
    const std::uint32_t other = __shfl_xor_sync(0xffffffffu, odd ? even_block : odd_block, 1);
    return odd ? make_uint2(other, odd_block) : make_uint2(even_block, other);
  }
};

// raw = acc + bias + low-rank terms for a thread's two row slots (rows `row` and `row + 8`, columns from `col`),
// where the row and column exist, each logit summed in logit_terms::raw's order. The rank loop is outermost and
// rolled: each of its steps loads the two rows' lora_p once and adds one term to every logit, where a rank loop per
// logit put 128 copies of it in the kernel (a fifth of a megabyte of code, fetched cold by a CTA's first tile).
template <class T>
__device__ __forceinline__ void add_raw_terms(float (&acc)[128], const logit_terms<T>& terms, std::int64_t row,
                                              std::int64_t col, const tile::tile_grid& g) {
  const bool has_row[2] = {row < g.rows, row + 8 < g.rows};
  const auto each_column = [&](const auto& add) {
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (col + 8 * j + e < g.cols) add(4 * j + e, col + 8 * j + e);
  };
  if (terms.bias) {
    each_column([&](int i, std::int64_t c) {
      const float b = detail::to_float(terms.bias[c]);
      if (has_row[0]) acc[i] += b;
      if (has_row[1]) acc[i + 2] += b;
    });
  }
#pragma unroll 1
  for (std::int64_t k = 0; k < terms.rank; ++k) {
    const float p0 = has_row[0] ? terms.lora_p[row * terms.rank + k] : 0.f;
    const float p1 = has_row[1] ? terms.lora_p[(row + 8) * terms.rank + k] : 0.f;
    each_column([&](int i, std::int64_t c) {
      const float b = detail::to_float(terms.lora_b[c * terms.ldb + k]);
      if (has_row[0]) acc[i] += p0 * b;
      if (has_row[1]) acc[i + 2] += p1 * b;
    });
  }
}

// Consumer warpgroups only: a barrier that leaves the producer out.
__device__ __forceinline__ void consumer_barrier() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(logit_tile_shape::consumer_warps * 32) : "memory");
}

}  // namespace cce::detail::sm90
