// Global-memory operands of the tile products and their staging into shared memory.
//
// An operand is a matrix of `extent` rows (the M or N side of the product) by `depth` (the K side). It is
// `k_major` when K is contiguous in memory (E and C in the logit product) and `mn_major` when the M/N index is
// (C and E as the right-hand side of dE = dZ C and dC = dZ^T E). Shared-memory tiles keep the global contiguous
// axis contiguous and lay rows out so that the ldmatrix row reads are free of bank conflicts (smem_tile).
#pragma once

#include <cstdint>

#include <cce/detail/validate.hpp>
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
  static constexpr int vec = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int contiguous = Major == major::k ? Depth : Extent;
  static constexpr int strided = Major == major::k ? Extent : Depth;
  static constexpr int chunks = contiguous / vec;  // per row
  // 16-bit tiles (the ldmatrix operands) keep rows unpadded and permute each row's 16-byte chunks by an XOR with
  // the row's position in its group of eight, so that the eight rows one ldmatrix (or one phase of cp.async
  // stores) touches fall into eight different bank groups. Other tiles pad each row by one chunk.
  static constexpr bool swizzled = sizeof(T) == 2 && chunks >= 2 && (chunks & (chunks - 1)) == 0;
  static constexpr int ld = swizzled ? contiguous : contiguous + vec;
  static constexpr int elems = strided * ld;
  static constexpr int row_bytes = ld * int(sizeof(T));
  static constexpr int rows_per_line = row_bytes >= 128 ? 1 : 128 / row_bytes;  // rows sharing a 128-byte line
  static constexpr int swizzle_mask = (chunks < 8 ? chunks : 8) - 1;

  // The chunk permutation of row s; periodic in s with period 8.
  __device__ __forceinline__ static constexpr int swizzle(int s) {
    return swizzled ? (s / rows_per_line) & swizzle_mask : 0;
  }
  // Byte offset of element (s, c) of the row-major (strided x contiguous) view.
  __device__ __forceinline__ static constexpr std::uint32_t offset(int s, int c) {
    return std::uint32_t(s * row_bytes + (((c / vec) ^ swizzle(s)) * vec + c % vec) * int(sizeof(T)));
  }
  // offset(s + ds, c + dc) from lane_offset = offset(s, c), for ds a multiple of 8 and dc a multiple of vec whose
  // chunk count shares no bit with c's (then the XOR of the permutation distributes over the chunk sum).
  __device__ __forceinline__ static constexpr std::uint32_t shifted(std::uint32_t lane_offset, int ds, int dc) {
    return (swizzled ? lane_offset ^ std::uint32_t((dc / vec) * 16) : lane_offset + dc * int(sizeof(T))) +
           std::uint32_t(ds * row_bytes);
  }
  __device__ __forceinline__ static T* at(T* base, int mn, int k) {
    return base + offset(Major == major::k ? mn : k, Major == major::k ? k : mn) / sizeof(T);
  }

  // Stages the (Extent x Depth) block at (mn0, k0). Vectorized: 16-byte cp.async, needs 16-byte aligned rows and
  // a contiguous axis that is a multiple of the vector; otherwise element by element. Out-of-range reads as 0.
  template <int Threads, bool Vectorized>
  __device__ __forceinline__ static void load(T* tile, const operand<T>& g, std::int64_t mn0, std::int64_t k0) {
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

// The vectorized loader with its per-thread state reduced to a few registers. The vectors a thread copies sit at
// strided positions s0 + j * step (j < per_thread) and one contiguous position c, the same every stage. Their
// global addresses are the tile's origin at the stage's K plus a 32-bit byte offset per vector, and which of them are
// in range is a count set once: a stage's bounds checks are one comparison per vector and one for K. Register
// pressure matters here: with 64-bit per-vector pointers and bounds, ptxas rematerialised the index arithmetic in
// every stage, between the main loop's MMAs. The offsets limit the operand's leading dimension (max_vector_ld).
template <class T, major Major, int Extent, int Depth, int Threads>
struct vector_loader {
  using tile = smem_tile<T, Major, Extent, Depth>;
  static constexpr int vec = tile::vec;
  static constexpr int contiguous = tile::contiguous;
  static constexpr int strided = tile::strided;
  static constexpr int per_row = tile::chunks;
  static constexpr int step = Threads / per_row;  // strided positions between a thread's vectors
  static constexpr int per_thread = strided / step;
  static_assert(contiguous % vec == 0 && Threads % per_row == 0 && strided % step == 0,
                "whole vectors, evenly spread over the threads");
  static_assert(!tile::swizzled || step % 8 == 0, "a thread's vectors share one chunk permutation");
  static_assert(strided <= max_vector_tile_rows && contiguous <= max_vector_tile_rows, "32-bit offsets suffice");

  const T* origin;            // element (mn0, K = 0)
  std::int64_t k_stride;      // elements per unit of K: 1 (k-major) or ld (mn-major)
  std::int64_t k_left;        // K positions from the thread's first vector to the operand's end
  std::uint32_t offset;       // bytes from the origin to the thread's first vector
  std::uint32_t offset_step;  // bytes between the thread's vectors
  std::uint32_t dst;          // the first vector's shared address in stage 0
  int mn_live;                // k-major: the thread's vectors with rows in range; mn-major: all or none (columns)

  __device__ __forceinline__ vector_loader(const operand<T>& op, std::int64_t mn0, T* stage0) {
    const int s0 = int(threadIdx.x) / per_row, c = (int(threadIdx.x) % per_row) * vec;
    offset = std::uint32_t((std::int64_t(s0) * op.ld + c) * std::int64_t(sizeof(T)));
    offset_step = std::uint32_t(std::int64_t(step) * op.ld * std::int64_t(sizeof(T)));
    if constexpr (Major == major::k) {
      origin = op.ptr + mn0 * op.ld;
      k_stride = 1;
      k_left = op.depth - c;
      const std::int64_t rows = op.extent - (mn0 + s0);  // rows in range from the first vector on
      const std::int64_t live = rows <= 0 ? 0 : (rows + step - 1) / step;
      mn_live = int(live < per_thread ? live : per_thread);
    } else {
      origin = op.ptr + mn0;
      k_stride = op.ld;
      k_left = op.depth - s0;
      mn_live = mn0 + c + vec <= op.extent ? per_thread : 0;
    }
    dst = ptx::smem_addr(tile::at(stage0, Major == major::k ? s0 : c, Major == major::k ? c : s0));
  }

  // Copies the tile at K offset k0 into the stage `stage_bytes` past stage 0.
  __device__ __forceinline__ void load(std::uint32_t stage_bytes, std::int64_t k0) const {
    constexpr std::uint32_t dst_step = step * tile::ld * sizeof(T);
    const char* base = reinterpret_cast<const char*>(origin + k0 * k_stride);
    const std::int64_t left = k_left - k0;
    // Vector j is copied when j < live (otherwise zero-filled, nothing read): k-major, its K columns are in range for
    // all or none of the thread's vectors; mn-major, its K row is while j * step < left.
    int live;
    if constexpr (Major == major::k) live = left >= vec ? mn_live : 0;
    else live = left <= 0 ? 0 : left >= strided ? mn_live : (mn_live == 0 ? 0 : int((left + step - 1) / step));
#pragma unroll
    for (int j = 0; j < per_thread; ++j)
      ptx::cp_async_16(dst + stage_bytes + j * dst_step, base + (offset + j * offset_step), j < live);
  }
};

}  // namespace cce::detail
