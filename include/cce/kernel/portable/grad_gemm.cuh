// Backward, step 2 of each chunk: the gradient products out(M x N) (+)= A(M x K) B(K x N) on the mainloop, with
//   dE_block  = dZ (rows x chunk, k-major)   * C_chunk (chunk x D, n-major)   K = classes of the chunk
//   dC_chunk  = dZ^T (chunk x rows, m-major) * E_block (rows x D, n-major)    K = rows of the block
// K tiles whose dZ tile the filter skipped are never loaded. Partial results carry over chunks (or row blocks)
// in an fp32 accumulator (optionally compensated) owned by one CTA per element, so the order is fixed and no
// atomics are needed; the last contribution writes the output type, adding to it when gradients accumulate.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cce/detail/element_type.hpp>
#include <cce/kernel/portable/mainloop.cuh>
#include <cce/reduce/kahan.hpp>

namespace cce::detail {

// Which K tiles of the product are live, read from the dZ kernel's tile flags. KTile (rows or classes per flag
// along K) is a compile-time constant so that the per-stage lookup is a shift, not a 64-bit division.
template <int KTile>
struct active_k_tiles {
  const std::uint8_t* flags = nullptr;  // (rows / bm) x chunk_tiles; null: every tile (a product not over dZ)
  std::int64_t chunk_tiles = 0;         // row pitch of flags: the chunk's tiles, or the walk's (plan::walk_flags)
  std::int64_t fixed_tile = 0;   // this CTA's row tile (dE) or vocab tile (dC)
  bool k_is_vocab = true;        // dE: K runs over classes; dC: K runs over rows

  __host__ __device__ __forceinline__ bool operator()(std::int64_t k) const {
    return flags == nullptr || *flag_of(k / KTile) != 0;
  }
  // The flag of K tile kt (non-null flags), and the distance to the next K tile's.
  __host__ __device__ __forceinline__ const std::uint8_t* flag_of(std::int64_t kt) const {
    return flags + (k_is_vocab ? fixed_tile * chunk_tiles + kt : kt * chunk_tiles + fixed_tile);
  }
  __host__ __device__ __forceinline__ std::int64_t flag_step() const { return k_is_vocab ? 1 : chunk_tiles; }

  // A walk over the live tiles of Bk elements (Bk divides KTile; K starts at a multiple of KTile): next(t) is the
  // first live tile at or after t, or k_tiles. Flags are read 32 at a time into a mask, so that the next live tile is
  // a bit scan, not a dependent load and a branch per tile (a dead tile would cost a round trip to L2 each). A warp
  // reads its window as a ballot, one flag per lane, and every lane calls next() with the same t; a thread alone
  // (OneThread: a producer that issues the loads by itself; the host) reads all 32 with independent loads. Two
  // registers of state: the mainloops run at the register cap.
  template <int Bk, bool OneThread = false>
  struct cursor {
    static_assert(KTile % Bk == 0, "a flag covers whole K tiles");
    static constexpr int per_flag = KTile / Bk;
    const active_k_tiles& tiles;
    std::int64_t k_begin;
    int k_tiles;
    int base = -32;  // first flag of the window, relative to k_begin
    unsigned mask = 0;

    __host__ __device__ __forceinline__ int next(int t) {
      while (t < k_tiles) {
        const int f = t / per_flag;
        if (f < base || f >= base + 32) {
          base = f;
          mask = window();
        }
        const unsigned bits = mask >> (f - base);
        if (bits != 0) {
          const int live = (f + lowest_bit(bits)) * per_flag;
          return live > t ? live : t;
        }
        t = (base + 32) * per_flag;
      }
      return k_tiles;
    }

   private:
#if defined(__CUDA_ARCH__)
    static constexpr bool by_ballot = !OneThread;
#else
    static constexpr bool by_ballot = false;  // the host reads alone
#endif
    // Bit i: flag base + i is live and in range (base is).
    __host__ __device__ __forceinline__ unsigned window() const {
      const int in_range = (k_tiles + per_flag - 1) / per_flag - base;
      if (tiles.flags == nullptr) return in_range >= 32 ? ~0u : (1u << in_range) - 1;
      const std::uint8_t* first = tiles.flag_of(k_begin / KTile + base);
      const std::int64_t step = tiles.flag_step();
      if constexpr (by_ballot) {
        const int lane = int(threadIdx.x % 32);
        return __ballot_sync(0xffffffffu, lane < in_range && first[lane * step] != 0);
      } else {
        // Every load issued before any is used: the addresses are clamped into range rather than guarded.
        std::uint8_t live[32];
        const std::uint8_t* at = first;
        const std::uint8_t* const last = first + (in_range - 1) * step;
#pragma unroll
        for (int i = 0; i < 32; ++i, at += step) live[i] = *(at < last ? at : last);
        unsigned m = 0;
#pragma unroll
        for (int i = 0; i < 32; ++i) m |= unsigned(i < in_range && live[i] != 0) << i;
        return m;
      }
    }
    __host__ __device__ __forceinline__ static int lowest_bit(unsigned bits) {
#if defined(__CUDA_ARCH__)
      return __ffs(int(bits)) - 1;
#else
      return __builtin_ctz(bits);
#endif
    }
  };
  template <int Bk>
  __device__ __forceinline__ cursor<Bk> walk(std::int64_t k_begin, int k_tiles) const {
    return {*this, k_begin, k_tiles};
  }
  template <int Bk>
  __host__ __device__ __forceinline__ cursor<Bk, true> walk_alone(std::int64_t k_begin, int k_tiles) const {
    return {*this, k_begin, k_tiles};
  }
};

// Part `part` of `parts` of a K range of k_blocks blocks of Bk elements, cut at whole flags of KTile so that no flag
// is split: blocks [first, end), empty for the parts past the range. The parts cover the range once, in order.
struct k_range {
  int first, end;
};
template <int KTile, int Bk>
__host__ __device__ __forceinline__ k_range k_part(int k_blocks, int parts, int part) {
  static_assert(KTile % Bk == 0, "a flag covers whole blocks");
  constexpr int per_flag = KTile / Bk;
  const int flags = (k_blocks + per_flag - 1) / per_flag;
  const int size = (flags + parts - 1) / parts * per_flag;
  const int first = part * size < k_blocks ? part * size : k_blocks;
  return {first, first + size < k_blocks ? first + size : k_blocks};
}

template <class T, class G, int KTile>
struct grad_gemm_params {
  operand<T> a, b;             // a: M x K, b: N x K in their majors
  std::int64_t m = 0, n = 0, k = 0;
  active_k_tiles<KTile> active{};
  float* acc = nullptr;        // M x N fp32 carry-over, null when this is the only contribution
  float* comp = nullptr;       // Kahan compensation of acc, or null
  // The carry shares the output's buffer (plan::carry_shares_de; the sm_90a TMA epilogue only): the first 128
  // columns of each 256 at `out` as an M x N/2 fp32 array, the last 128 at acc, the same.
  bool carry_shares_output = false;
  bool first = true, last = true;
  bool accumulate = false;     // out += result instead of out = result
  G* out = nullptr;
  std::int64_t ld_out = 0;
  const std::int32_t* out_rows = nullptr;  // output row of each product row (scatter to the classes), null: same
  // Low-rank head (dE only, on the last chunk): out += scale * q (M x r) a (r x N).
  const float* lora_q = nullptr;
  const T* lora_a = nullptr;
  std::int64_t rank = 0, lda = 0;
  float lora_scale = 0.f;
  // The near-uniform rows' baseline (uniform_baseline.cuh), on the last contribution: out += s_i t (t: N values,
  // s: M values, null for all 1).
  const float* baseline_rows = nullptr;
  const float* baseline_term = nullptr;
  // The product's row i scaled by row_scale[i] (null: 1), before it is folded in.
  const float* row_scale = nullptr;
  // Runs only if *enabled != 0 (null: always): products that the rows decide on the device (the first-order
  // baseline's, dispatch/portable.cuh).
  const int* enabled = nullptr;
  // A symmetric product: only the output tiles that reach the diagonal or above; the caller mirrors the rest. The
  // output's column 0 is column diagonal_col of the symmetric matrix (a slab of its columns).
  bool upper = false;
  std::int64_t diagonal_col = 0;

  __device__ __forceinline__ bool disabled() const { return enabled != nullptr && *enabled == 0; }
  // Whether the output tile at (row0, col0) of `cols` columns is skipped: strictly below the diagonal of an upper one.
  __device__ __forceinline__ bool below_diagonal(std::int64_t row0, std::int64_t col0, int cols) const {
    return upper && diagonal_col + col0 + cols <= row0;
  }

  __device__ __forceinline__ float baseline_scale(std::int64_t row) const {
    return baseline_rows ? baseline_rows[row] : 1.f;
  }
  __device__ __forceinline__ float baseline(std::int64_t row, std::int64_t col) const {
    return baseline_scale(row) * baseline_term[col];
  }
};

// Folds elements x[0..Count) of row `row`, columns col0.., of the product into the output: carried in fp32
// (optionally compensated) until the last contribution, which adds the low-rank and baseline terms and writes G
// (adding to what is there when gradients accumulate). What the output step reads is loaded first, by load(): the
// compiler has to assume that the carry, its compensation and the output may alias, so code that loads each element
// right before storing it would wait for every load in turn; loading several runs before storing them overlaps the
// waits.
template <int Count, class G>
struct gradient_run {
  float carried[Count], comp[Count], prev[Count];

  template <class T, int KTile>
  __device__ __forceinline__ static G* output(const grad_gemm_params<T, G, KTile>& prm, std::int64_t row,
                                              std::int64_t col0) {
    return prm.out + (prm.out_rows ? std::int64_t(prm.out_rows[row]) : row) * prm.ld_out + col0;
  }

  template <class T, int KTile>
  __device__ __forceinline__ void load(const grad_gemm_params<T, G, KTile>& prm, std::int64_t row, std::int64_t col0) {
    const std::int64_t base = row * prm.n + col0;
    const bool carry_in = prm.acc && !prm.first, add_prev = prm.accumulate && prm.last;
    const G* out = add_prev ? output(prm, row, col0) : nullptr;
#pragma unroll
    for (int q = 0; q < Count; ++q) {
      const bool in = col0 + q < prm.n;
      carried[q] = in && carry_in ? prm.acc[base + q] : 0.f;
      comp[q] = in && carry_in && prm.comp ? prm.comp[base + q] : 0.f;
      if constexpr (std::is_same_v<G, float>) prev[q] = in && add_prev ? out[q] : 0.f;
      else prev[q] = in && add_prev ? to_float(out[q]) : 0.f;
    }
  }

  template <class T, int KTile>
  __device__ __forceinline__ void store(const grad_gemm_params<T, G, KTile>& prm, std::int64_t row,
                                        std::int64_t col0, const float (&x)[Count]) const {
    const std::int64_t base = row * prm.n + col0;
    G* out = output(prm, row, col0);
#pragma unroll
    for (int q = 0; q < Count; ++q) {
      if (col0 + q >= prm.n) continue;
      float total = x[q];
      if (prm.acc) {
        kahan_sum k{carried[q], comp[q]};
        if (prm.comp) k.add(x[q]);
        else k.sum += x[q];
        if (!prm.last) {
          prm.acc[base + q] = k.sum;
          if (prm.comp) prm.comp[base + q] = k.compensation;
          continue;
        }
        total = k.value();
      }
      if (prm.rank) {
        float l = 0.f;
        for (std::int64_t r = 0; r < prm.rank; ++r)
          l += prm.lora_q[row * prm.rank + r] * to_float(prm.lora_a[r * prm.lda + col0 + q]);
        total += prm.lora_scale * l;
      }
      if (prm.baseline_term) total += prm.baseline(row, col0 + q);
      if constexpr (std::is_same_v<G, float>) out[q] = prev[q] + total;
      else out[q] = from_float<G>(prev[q] + total);
    }
  }
};

// Which of the CTA's K tiles the filter kept: any, and all. Every thread of the CTA calls it.
struct k_tile_census {
  bool any = false, all = true;
};
template <int KTile, class T, class G>
__device__ __forceinline__ k_tile_census census(const grad_gemm_params<T, G, KTile>& p,
                                               const active_k_tiles<KTile>& active) {
  bool any = false, all = true;
  for (std::int64_t k = std::int64_t(threadIdx.x) * KTile; k < p.k; k += std::int64_t(blockDim.x) * KTile) {
    const bool live = active(k);
    any = any || live;
    all = all && live;
  }
  return {__syncthreads_or(any) != 0, __syncthreads_and(all) != 0};
}

// Whether the CTA's product changes nothing: a contribution between the first and the last (the carry is read and
// written) with no live k-tile leaves the carry as it is. On peaked data most output tiles of the minimal schedule's
// many small products are such.
template <int KTile, class T, class G>
__device__ __forceinline__ bool adds_nothing(const grad_gemm_params<T, G, KTile>& p, const k_tile_census& live) {
  return !live.any && p.acc != nullptr && !p.first && !p.last;
}

template <class T, class G, class Policy, major MajorA, major MajorB, bool Vectorized>
__global__ void __launch_bounds__(Policy::threads, Policy::min_blocks)
    grad_gemm_kernel(const __grid_constant__ grad_gemm_params<T, G, Policy::bm> prm) {
  using mainloop = mainloop_for<T, Policy, MajorA, MajorB>;
  using layout = typename mainloop::fragment_layout;
  extern __shared__ __align__(16) unsigned char smem[];
  const std::int64_t m0 = std::int64_t(blockIdx.x) * Policy::bm, n0 = std::int64_t(blockIdx.y) * Policy::bn;

  if (prm.disabled() || prm.below_diagonal(m0, n0, Policy::bn)) return;
  active_k_tiles<Policy::bm> active = prm.active;
  active.fixed_tile = blockIdx.x;
  const k_tile_census live = census(prm, active);
  if (adds_nothing(prm, live)) return;
  typename mainloop::accumulators acc;
  mainloop::clear(acc);
  // Every K tile live (lm-like and uniform data): the plain walk, without the live-tile queue's bookkeeping between
  // the MMAs; on the vector path only, which the large problems take.
  if constexpr (Vectorized) {
    if (live.all) mainloop::template run<true>(acc, smem, prm.a, m0, prm.b, n0, 0, prm.k);
    else mainloop::template run<true>(acc, smem, prm.a, m0, prm.b, n0, 0, prm.k, active);
  } else {
    mainloop::template run<false>(acc, smem, prm.a, m0, prm.b, n0, 0, prm.k, active);
  }

  const layout f;
#pragma unroll
  for (int s = 0; s < layout::row_slots; ++s) {
    const std::int64_t row = m0 + f.row(s);
    if (row >= prm.m) continue;
    const float scale = prm.row_scale ? prm.row_scale[row] : 1.f;
#pragma unroll
    for (int c = 0; c < layout::cols; ++c) {
      const std::int64_t col = n0 + f.col(c);
      if (col >= prm.n) continue;
      const float x[1] = {scale * layout::at(acc, s, c)};
      gradient_run<1, G> run;
      run.load(prm, row, col);
      run.store(prm, row, col, x);
    }
  }
}

}  // namespace cce::detail
