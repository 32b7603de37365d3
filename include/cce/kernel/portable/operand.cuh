// Global-memory operands of the tile products and their staging into shared memory.
//
// An operand is a matrix of `extent` rows (the M or N side of the product) by `depth` (the K side). It is
// `k_major` when K is contiguous in memory (E and C in the logit product) and `mn_major` when the M/N index is
// (C and E as the right-hand side of dE = dZ C and dC = dZ^T E). Shared-memory tiles keep the global contiguous
// axis contiguous and pad each row by one 16-byte vector, which makes the ldmatrix row reads conflict-free.
#pragma once

#include <cstdint>

#include <cce/kernel/portable/ptx.cuh>

namespace cce::detail {

enum class major { k, mn };

template <class T>
struct operand {
  const T* ptr = nullptr;
  std::int64_t ld = 0;      // elements between consecutive rows of the contiguous layout
  std::int64_t extent = 0;  // valid M or N range: [0, extent)
  std::int64_t depth = 0;   // valid K range: [0, depth)

  template <major Major>
  __device__ __forceinline__ const T* at(std::int64_t mn, std::int64_t k) const {
    return Major == major::k ? ptr + mn * ld + k : ptr + k * ld + mn;
  }
};

template <class T, major Major, int Extent, int Depth>
struct smem_tile {
  static constexpr int vec = 16 / int(sizeof(T));
  static constexpr int ld = (Major == major::k ? Depth : Extent) + vec;
  static constexpr int elems = (Major == major::k ? Extent : Depth) * ld;

  __device__ __forceinline__ static T* at(T* base, int mn, int k) {
    return Major == major::k ? base + mn * ld + k : base + k * ld + mn;
  }

  // Stages the (Extent x Depth) block at (mn0, k0). Vectorized: 16-byte cp.async, needs 16-byte aligned rows and
  // a contiguous axis that is a multiple of the vector; otherwise element by element. Out-of-range reads as 0.
  template <int Threads, bool Vectorized>
  __device__ __forceinline__ static void load(T* tile, const operand<T>& g, std::int64_t mn0, std::int64_t k0) {
    constexpr int contiguous = Major == major::k ? Depth : Extent;
    constexpr int strided = Major == major::k ? Extent : Depth;
    if constexpr (Vectorized) {
      constexpr int vectors = strided * (contiguous / vec);
      static_assert(contiguous % vec == 0, "tile rows are whole vectors");
#pragma unroll
      for (int idx = threadIdx.x; idx < vectors; idx += Threads) {
        const int s = idx / (contiguous / vec);
        const int c = (idx % (contiguous / vec)) * vec;
        const int mn = Major == major::k ? s : c;
        const int k = Major == major::k ? c : s;
        const bool valid = (Major == major::k) ? (mn0 + mn < g.extent && k0 + k + vec <= g.depth)
                                               : (k0 + k < g.depth && mn0 + mn + vec <= g.extent);
        const T* src = valid ? g.template at<Major>(mn0 + mn, k0 + k) : g.ptr;
        ptx::cp_async_16(at(tile, mn, k), src, valid);
      }
    } else {
      for (int idx = threadIdx.x; idx < strided * contiguous; idx += Threads) {
        const int s = idx / contiguous, c = idx % contiguous;
        const int mn = Major == major::k ? s : c;
        const int k = Major == major::k ? c : s;
        const bool valid = mn0 + mn < g.extent && k0 + k < g.depth;
        *at(tile, mn, k) = valid ? *g.template at<Major>(mn0 + mn, k0 + k) : T(0.f);
      }
    }
  }
};

// The vectorized loader with its per-thread state precomputed: the tile positions a thread copies are the same
// every stage, so their global pointers, shared addresses and extent checks are formed once and each stage
// only adds its K offset (the index arithmetic otherwise rivals the tensor-core work).
template <class T, major Major, int Extent, int Depth, int Threads>
struct vector_loader {
  using tile = smem_tile<T, Major, Extent, Depth>;
  static constexpr int vec = tile::vec;
  static constexpr int contiguous = Major == major::k ? Depth : Extent;
  static constexpr int strided = Major == major::k ? Extent : Depth;
  static constexpr int per_row = contiguous / vec;
  static constexpr int vectors = strided * per_row;
  static constexpr int per_thread = vectors / Threads;
  static_assert(contiguous % vec == 0 && vectors % Threads == 0, "whole vectors, evenly spread over the threads");

  const T* src[per_thread];
  std::uint32_t dst[per_thread];
  int k_of[per_thread];
  bool mn_ok[per_thread];
  const T* base;
  std::int64_t k_step;  // elements per unit of K in global memory
  std::int64_t depth;

  __device__ __forceinline__ vector_loader(const operand<T>& g, std::int64_t mn0, T* stage0)
      : base(g.ptr), k_step(Major == major::k ? 1 : g.ld), depth(g.depth) {
#pragma unroll
    for (int j = 0; j < per_thread; ++j) {
      const int idx = threadIdx.x + j * Threads;
      const int s = idx / per_row, c = (idx % per_row) * vec;
      const int mn = Major == major::k ? s : c;
      const int k = Major == major::k ? c : s;
      mn_ok[j] = Major == major::k ? mn0 + mn < g.extent : mn0 + mn + vec <= g.extent;
      src[j] = mn_ok[j] ? g.template at<Major>(mn0 + mn, k) : g.ptr;
      dst[j] = ptx::smem_addr(tile::at(stage0, mn, k));
      k_of[j] = k;
    }
  }

  // Copies the tile at K offset k0 into the stage `stage_bytes` past stage 0.
  __device__ __forceinline__ void load(std::uint32_t stage_bytes, std::int64_t k0) const {
#pragma unroll
    for (int j = 0; j < per_thread; ++j) {
      const bool valid = mn_ok[j] && (Major == major::k ? k0 + k_of[j] + vec <= depth : k0 + k_of[j] < depth);
      ptx::cp_async_16(dst[j] + stage_bytes, valid ? src[j] + k0 * k_step : base, valid);
    }
  }
};

}  // namespace cce::detail
