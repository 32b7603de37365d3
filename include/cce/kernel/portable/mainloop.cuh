// The CTA-level tile product acc(BM x BN) = A(BM x K) * B(BN x K)^T over a K range, pipelined through `stages`
// shared-memory buffers with cp.async. Two implementations share one interface:
//   - mma_mainloop: bf16/fp16 operands on tensor cores (ldmatrix + mma.sync m16n8k16), fp32 accumulators;
//   - simt_mainloop: fp32 operands with fp32 FMA (exact fp32, no TF32).
// Both expose the accumulator fragment through `fragment_layout`: which tile rows and columns a thread owns and
// which lanes share them, so epilogues (softmax statistics, dZ, stores) are written once for both.
//
// K tiles can be skipped by a predicate (gradient filtering): skipped tiles are never loaded.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include <cce/kernel/portable/operand.cuh>
#include <cce/kernel/portable/ptx.cuh>
#include <cce/tile/policy.hpp>

namespace cce::detail {

// Every K tile is live. An Active type walks its live K tiles of Bk elements through a cursor: next(t) is the first
// live tile at or after t, or the tile count.
struct always_active {
  struct cursor {
    __device__ __forceinline__ int next(int t) const { return t; }
  };
  template <int Bk>
  __device__ __forceinline__ cursor walk(std::int64_t, int) const {
    return {};
  }
};

// The load side of both pipelines below: issues the live K tiles in order, one stage per call, and remembers which
// tile each loaded stage holds. Each call commits exactly one (possibly empty) cp.async group, so waiting for all but
// `stages - 2` groups leaves the oldest loaded stage resident. Only the loads look for live tiles; the computations
// replay their choices `stages - 1` tiles later from a queue in registers (with every tile live, a count does).
template <int Stages, int Bk, class LoadStage, class Active>
struct live_tile_loads {
  LoadStage& load;
  const std::int64_t k_begin;
  const int k_tiles;
  decltype(std::declval<const Active&>().template walk<Bk>(std::int64_t(0), 0)) live;
  int next;                // the next live tile to load (k_tiles: none)
  int queued[Stages - 1];  // the tile in each loaded stage, oldest first

  // Issues the first `stages - 1` stages. K ranges of one product are below 2^31 tiles.
  __device__ __forceinline__ live_tile_loads(LoadStage& l, std::int64_t begin, std::int64_t end, const Active& active)
      : load(l),
        k_begin(begin),
        k_tiles(int((end - begin + Bk - 1) / Bk)),
        live(active.template walk<Bk>(begin, k_tiles)) {
    next = live.next(0);
#pragma unroll
    for (int s = 0; s < Stages - 1; ++s) queued[s] = issue(s);
  }
  // Loads the next live tile into `stage`; returns it (k_tiles: none).
  __device__ __forceinline__ int issue(int stage) {
    const int t = next;
    if (t < k_tiles) {
      load(stage, k_begin + std::int64_t(t) * Bk);
      next = live.next(t + 1);
    }
    ptx::cp_async_commit();
    return t;
  }
  __device__ __forceinline__ bool any() const { return queued[0] < k_tiles; }
  // Runs step() once per live tile; each call computes the oldest loaded stage, issues one stage and returns the tile
  // that issue loaded.
  template <class Step>
  __device__ __forceinline__ void for_each_tile(Step&& step) {
    if constexpr (std::is_same_v<Active, always_active>) {
      for (int t = 0; t < k_tiles; ++t) step();
    } else {
      while (queued[0] < k_tiles) {
        const int loaded = step();
#pragma unroll
        for (int s = 0; s + 1 < Stages - 1; ++s) queued[s] = queued[s + 1];
        queued[Stages - 2] = loaded;
      }
    }
  }
};

// Multi-stage cp.async pipeline over the live K tiles: `stages - 1` tiles are in flight while one is computed.
template <int Stages, int Bk, class LoadStage, class ComputeStage, class Active>
__device__ __forceinline__ void run_pipeline(std::int64_t k_begin, std::int64_t k_end, LoadStage&& load,
                                             ComputeStage&& compute, const Active& active) {
  live_tile_loads<Stages, Bk, LoadStage, Active> loads(load, k_begin, k_end, active);
  int read = 0, write = Stages - 1;
  loads.for_each_tile([&] {
    ptx::cp_async_wait<Stages - 2>();
    __syncthreads();  // the stage computed last iteration is free to be overwritten
    const int loaded = loads.issue(write);
    compute(read);
    read = read + 1 == Stages ? 0 : read + 1;
    write = write + 1 == Stages ? 0 : write + 1;
    return loaded;
  });
  ptx::cp_async_wait<0>();
  __syncthreads();  // shared memory may be reused by the epilogue
}

// The same pipeline with the computation's shared-memory reads one k step ahead of its MMAs, across stages too:
// fragments(buf, stage, kk) reads k step kk of `stage` into register set `buf`, products(buf) multiplies a set.
// The barrier that frees a stage sits before the stage's last k step, whose fragments are already read, so the next
// stage's first fragments load under that step's MMAs and no MMA waits on a read issued just before it. Needs two
// fragment sets in registers (one CTA per SM) and an even number of k steps per stage (the set alternates).
template <int Stages, int Bk, class LoadStage, class Fragments, class Products, class Active>
__device__ __forceinline__ void run_prefetch_pipeline(std::int64_t k_begin, std::int64_t k_end, LoadStage&& load,
                                                      Fragments&& fragments, Products&& products,
                                                      const Active& active) {
  constexpr int k_steps = Bk / 16;
  static_assert(k_steps % 2 == 0, "the fragment set of a stage's first k step is the same every stage");
  static_assert(Stages >= 3, "a stage is refilled while the next is computed and the one after is in flight");
  live_tile_loads<Stages, Bk, LoadStage, Active> loads(load, k_begin, k_end, active);
  ptx::cp_async_wait<Stages - 2>();
  __syncthreads();
  int read = 0, write = Stages - 1;
  if (loads.any()) fragments(0, read, 0);
  loads.for_each_tile([&] {  // computes the stage `read`
    int loaded = loads.k_tiles;
#pragma unroll
    for (int kk = 0; kk < k_steps; ++kk) {
      if (kk == k_steps - 1) {  // the stage's reads are issued: free it, and have the next one resident
        ptx::cp_async_wait<Stages - 2>();
        __syncthreads();
        read = read + 1 == Stages ? 0 : read + 1;
        write = write + 1 == Stages ? 0 : write + 1;
      }
      fragments((kk + 1) % 2, read, (kk + 1) % k_steps);  // past the last tile: a stale stage, never used
      if (kk == 0) loaded = loads.issue(write);
      products(kk % 2);
    }
    return loaded;
  });
  ptx::cp_async_wait<0>();
  __syncthreads();
}

template <class T, class Policy, major MajorA, major MajorB>
struct mma_mainloop {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "tensor-core path is 16-bit");
  using tile_a = smem_tile<T, MajorA, Policy::bm, Policy::bk>;
  using tile_b = smem_tile<T, MajorB, Policy::bn, Policy::bk>;
  static constexpr int mi = Policy::warp_m / 16;  // m16 fragments per warp
  static constexpr int nj = Policy::warp_n / 8;   // n8 fragments per warp
  static_assert(nj % 2 == 0, "B fragments are loaded in n16 pairs");
  static constexpr std::size_t smem_bytes = std::size_t(Policy::stages) * (tile_a::elems + tile_b::elems) * sizeof(T);
  // smem_tile::shifted moves an mn-major lane offset by fragment chunks 2i (2jj) that must not share bits with the
  // warp's first chunk, a multiple of 2 mi (nj): powers of two keep them apart.
  static constexpr bool pow2(int x) { return (x & (x - 1)) == 0; }
  static_assert((MajorA == major::k || pow2(mi)) && (MajorB == major::k || pow2(nj / 2)),
                "mn-major operands need a power-of-two number of fragments per warp");
  // At one CTA per SM the registers hold two fragment sets: run_prefetch_pipeline. Under a two-CTA register cap
  // the second set spills, and the compiler's own hoisting within a k step does better.
  static constexpr bool prefetch_fragments = Policy::min_blocks == 1 && Policy::bk % 32 == 0 && Policy::stages >= 3;

  struct accumulators {
    float c[mi][nj][4];
  };

  // Which accumulator elements a thread holds. Row slot s covers tile row `row(s)`; each slot has `cols` columns.
  struct fragment_layout {
    static constexpr int row_slots = mi * 2;
    static constexpr int cols = nj * 2;
    static constexpr bool paired_cols = true;  // columns 2i and 2i + 1 are adjacent
    // Lanes sharing a row differ in the lane bits first << i, i < count; the leader lane then holds the warp's
    // partial, and `row_groups` warps hold partials of the same row.
    static constexpr int row_shuffle_first = 1, row_shuffle_count = 2;
    static constexpr int row_lanes = 1 << row_shuffle_count;
    static constexpr int row_groups = Policy::warps_n;
    static constexpr int col_shuffle_first = 4, col_shuffle_count = 3;
    static constexpr int col_groups = Policy::warps_m;

    int warp_m, warp_n, g, t;
    __device__ fragment_layout() {
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      warp_m = warp / Policy::warps_n;
      warp_n = warp % Policy::warps_n;
      g = lane / 4;
      t = lane % 4;
    }
    __device__ __forceinline__ int row(int slot) const { return warp_m * Policy::warp_m + (slot / 2) * 16 + g + (slot % 2) * 8; }
    __device__ __forceinline__ int col(int c) const { return warp_n * Policy::warp_n + (c / 2) * 8 + t * 2 + (c % 2); }
    __device__ __forceinline__ int row_group() const { return warp_n; }
    __device__ __forceinline__ int row_lane() const { return t; }  // position among the lanes sharing a row
    __device__ __forceinline__ int col_group() const { return warp_m; }
    __device__ __forceinline__ bool col_leader() const { return g == 0; }
    __device__ __forceinline__ static float& at(accumulators& acc, int slot, int c) {
      return acc.c[slot / 2][c / 2][(slot % 2) * 2 + (c % 2)];
    }
  };

  __device__ __forceinline__ static void clear(accumulators& acc) {
#pragma unroll
    for (int i = 0; i < mi; ++i)
#pragma unroll
      for (int j = 0; j < nj; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc.c[i][j][e] = 0.f;
  }

  template <bool Vectorized, class Active = always_active>
  __device__ __forceinline__ static void run(accumulators& acc, void* smem, const operand<T>& a, std::int64_t m0,
                                             const operand<T>& b, std::int64_t n0, std::int64_t k_begin,
                                             std::int64_t k_end, const Active& active = {}) {
    T* sa = static_cast<T*>(smem);
    T* sb = sa + Policy::stages * tile_a::elems;
    const fragment_layout f;
    const int lane = threadIdx.x % 32;
    constexpr std::uint32_t a_stage = tile_a::elems * sizeof(T), b_stage = tile_b::elems * sizeof(T);

    // Lane-dependent offsets of the ldmatrix reads within a stage; fragment i (m) or jj (n) and k step kk move
    // them by whole groups of eight rows and by chunks disjoint from the lane's (smem_tile::shifted).
    const int wm = f.warp_m * Policy::warp_m, wn = f.warp_n * Policy::warp_n;
    const std::uint32_t a_lane =
        MajorA == major::k ? tile_a::offset(wm + lane % 16, (lane / 16) * 8)
                           : tile_a::offset(lane % 8 + (lane / 16) * 8, wm + ((lane / 8) % 2) * 8);
    const std::uint32_t b_lane =
        MajorB == major::k ? tile_b::offset(wn + lane % 8 + (lane / 16) * 8, ((lane / 8) % 2) * 8)
                           : tile_b::offset(lane % 8 + ((lane / 8) % 2) * 8, wn + (lane / 16) * 8);
    const std::uint32_t a_base = ptx::smem_addr(sa), b_base = ptx::smem_addr(sb);
    auto a_offset = [](std::uint32_t lane_addr, int i, int kk) {
      return MajorA == major::k ? tile_a::shifted(lane_addr, i * 16, kk) : tile_a::shifted(lane_addr, kk, i * 16);
    };
    auto b_offset = [](std::uint32_t lane_addr, int jj, int kk) {
      return MajorB == major::k ? tile_b::shifted(lane_addr, jj * 16, kk) : tile_b::shifted(lane_addr, kk, jj * 16);
    };

    auto read_a = [&](std::uint32_t (&r)[4], std::uint32_t ta, int i, int kk) {
      if constexpr (MajorA == major::k) ptx::ldmatrix_x4(r, ta + a_offset(a_lane, i, kk));
      else ptx::ldmatrix_x4_trans(r, ta + a_offset(a_lane, i, kk));
    };
    auto read_b = [&](std::uint32_t (&r)[4], std::uint32_t tb, int jj, int kk) {
      if constexpr (MajorB == major::k) ptx::ldmatrix_x4(r, tb + b_offset(b_lane, jj, kk));
      else ptx::ldmatrix_x4_trans(r, tb + b_offset(b_lane, jj, kk));
    };
    auto pipeline = [&](auto&& load) {
      if constexpr (prefetch_fragments) {
        std::uint32_t af[2][mi][4], bf[2][nj / 2][4];
        auto fragments = [&](int buf, int stage, int kk) {
          const std::uint32_t ta = a_base + stage * a_stage, tb = b_base + stage * b_stage;
#pragma unroll
          for (int i = 0; i < mi; ++i) read_a(af[buf][i], ta, i, kk * 16);
#pragma unroll
          for (int jj = 0; jj < nj / 2; ++jj) read_b(bf[buf][jj], tb, jj, kk * 16);
        };
        auto products = [&](int buf) {
#pragma unroll
          for (int jj = 0; jj < nj / 2; ++jj)
#pragma unroll
            for (int i = 0; i < mi; ++i) {
              ptx::mma_m16n8k16<T>::run(acc.c[i][2 * jj], af[buf][i], bf[buf][jj][0], bf[buf][jj][1]);
              ptx::mma_m16n8k16<T>::run(acc.c[i][2 * jj + 1], af[buf][i], bf[buf][jj][2], bf[buf][jj][3]);
            }
        };
        run_prefetch_pipeline<Policy::stages, Policy::bk>(k_begin, k_end, load, fragments, products, active);
      } else {
        auto compute = [&](int stage) {
          const std::uint32_t ta = a_base + stage * a_stage, tb = b_base + stage * b_stage;
#pragma unroll
          for (int kk = 0; kk < Policy::bk; kk += 16) {
            std::uint32_t af[mi][4];
#pragma unroll
            for (int i = 0; i < mi; ++i) read_a(af[i], ta, i, kk);
#pragma unroll
            for (int jj = 0; jj < nj / 2; ++jj) {
              std::uint32_t bf[4];
              read_b(bf, tb, jj, kk);
#pragma unroll
              for (int i = 0; i < mi; ++i) {
                ptx::mma_m16n8k16<T>::run(acc.c[i][2 * jj], af[i], bf[0], bf[1]);
                ptx::mma_m16n8k16<T>::run(acc.c[i][2 * jj + 1], af[i], bf[2], bf[3]);
              }
            }
          }
        };
        run_pipeline<Policy::stages, Policy::bk>(k_begin, k_end, load, compute, active);
      }
    };
    if constexpr (Vectorized) {
      const vector_loader<T, MajorA, Policy::bm, Policy::bk, Policy::threads> la(a, m0, sa);
      const vector_loader<T, MajorB, Policy::bn, Policy::bk, Policy::threads> lb(b, n0, sb);
      pipeline([&](int stage, std::int64_t k0) {
        la.load(stage * a_stage, k0);
        lb.load(stage * b_stage, k0);
      });
    } else {
      pipeline([&](int stage, std::int64_t k0) {
        tile_a::template load<Policy::threads, false>(sa + stage * tile_a::elems, a, m0, k0);
        tile_b::template load<Policy::threads, false>(sb + stage * tile_b::elems, b, n0, k0);
      });
    }
  }
};

template <class Policy, major MajorA, major MajorB>
struct simt_mainloop {
  using T = float;
  static_assert(Policy::threads == 256, "the fp32 path lays 256 threads out as 16 x 16");
  static constexpr int tm = Policy::bm / 16;
  static constexpr int tn = Policy::bn / 16;
  using tile_a = smem_tile<T, MajorA, Policy::bm, Policy::bk>;
  using tile_b = smem_tile<T, MajorB, Policy::bn, Policy::bk>;
  static constexpr std::size_t smem_bytes = std::size_t(Policy::stages) * (tile_a::elems + tile_b::elems) * sizeof(T);

  struct accumulators {
    float c[tm][tn];
  };

  // Thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 i and columns tx + 16 j.
  struct fragment_layout {
    static constexpr int row_slots = tm;
    static constexpr int cols = tn;
    static constexpr bool paired_cols = false;
    static constexpr int row_shuffle_first = 1, row_shuffle_count = 4;
    static constexpr int row_lanes = 1 << row_shuffle_count;
    static constexpr int row_groups = 1;
    static constexpr int col_shuffle_first = 16, col_shuffle_count = 1;
    static constexpr int col_groups = 8;

    int ty, tx;
    __device__ fragment_layout() : ty(threadIdx.x / 16), tx(threadIdx.x % 16) {}
    __device__ __forceinline__ int row(int slot) const { return ty + 16 * slot; }
    __device__ __forceinline__ int col(int c) const { return tx + 16 * c; }
    __device__ __forceinline__ int row_group() const { return 0; }
    __device__ __forceinline__ int row_lane() const { return tx; }
    __device__ __forceinline__ int col_group() const { return threadIdx.x / 32; }
    __device__ __forceinline__ bool col_leader() const { return (threadIdx.x % 32) < 16; }
    __device__ __forceinline__ static float& at(accumulators& acc, int slot, int c) { return acc.c[slot][c]; }
  };

  __device__ __forceinline__ static void clear(accumulators& acc) {
#pragma unroll
    for (int i = 0; i < tm; ++i)
#pragma unroll
      for (int j = 0; j < tn; ++j) acc.c[i][j] = 0.f;
  }

  template <bool Vectorized, class Active = always_active>
  __device__ __forceinline__ static void run(accumulators& acc, void* smem, const operand<T>& a, std::int64_t m0,
                                             const operand<T>& b, std::int64_t n0, std::int64_t k_begin,
                                             std::int64_t k_end, const Active& active = {}) {
    T* sa = static_cast<T*>(smem);
    T* sb = sa + Policy::stages * tile_a::elems;
    const fragment_layout f;
    auto load = [&](int stage, std::int64_t k0) {
      tile_a::template load<Policy::threads, Vectorized>(sa + stage * tile_a::elems, a, m0, k0);
      tile_b::template load<Policy::threads, Vectorized>(sb + stage * tile_b::elems, b, n0, k0);
    };
    auto compute = [&](int stage) {
      T* ta = sa + stage * tile_a::elems;
      T* tb = sb + stage * tile_b::elems;
#pragma unroll 4
      for (int k = 0; k < Policy::bk; ++k) {
        float av[tm], bv[tn];
#pragma unroll
        for (int i = 0; i < tm; ++i) av[i] = *tile_a::at(ta, f.row(i), k);
#pragma unroll
        for (int j = 0; j < tn; ++j) bv[j] = *tile_b::at(tb, f.col(j), k);
#pragma unroll
        for (int i = 0; i < tm; ++i)
#pragma unroll
          for (int j = 0; j < tn; ++j) acc.c[i][j] = fmaf(av[i], bv[j], acc.c[i][j]);
      }
    };
    run_pipeline<Policy::stages, Policy::bk>(k_begin, k_end, load, compute, active);
  }
};

// A policy's tile twice as wide, with warp tiles twice as tall, at one CTA per SM: the forward runs on it where a
// CTA may take its shared memory (144 KiB of stages at the default policy: sm_80 and sm_90, not sm_86 / sm_89). Its
// registers hold two fragment sets (prefetch_fragments), and a 64 x 64 warp tile reads half the shared memory per
// MMA that a 32 x 64 one does (docs/performance.md; the gradient products measured slower on it). Building with
// CCE_PORTABLE_WIDE_TILES=0 keeps the policy's own tile everywhere (one forward image fewer).
template <class Policy>
using wide_policy = tile::policy<Policy::bm, 2 * Policy::bn, Policy::bk, 3, Policy::warps_m / 2, Policy::warps_n * 2, 1,
                                 Policy::forward_ctas_per_sm>;
#ifndef CCE_PORTABLE_WIDE_TILES
#define CCE_PORTABLE_WIDE_TILES 1
#endif
template <class T, class Policy>
inline constexpr bool has_wide_tiles = CCE_PORTABLE_WIDE_TILES && sizeof(T) == 2 && Policy::warps_m % 2 == 0 &&
                                       2 * Policy::warp_m <= 64 && Policy::warp_n <= 64 && Policy::bk % 32 == 0;

// The mainloop for an element type: tensor cores for 16-bit types, exact FMA for fp32.
template <class T, class Policy, major MajorA, major MajorB>
using mainloop_for = std::conditional_t<std::is_same_v<T, float>, simt_mainloop<Policy, MajorA, MajorB>,
                                        mma_mainloop<T, Policy, MajorA, MajorB>>;

}  // namespace cce::detail
