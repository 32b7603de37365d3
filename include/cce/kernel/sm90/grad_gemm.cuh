// Hopper backward step 2 (sm_90a): the gradient products of kernel/portable/grad_gemm.cuh, same parameters and
// epilogue, on the tile engine of logit_tile.cuh:
//   dE_block = dZ C_chunk     A = dZ K-major (rows x classes),    B = C_chunk MN-major (D contiguous)
//   dC_chunk = dZ^T E_block   A = dZ MN-major (classes contiguous), B = E_block MN-major
// Output tiles are 128 x 256 (128 rows or classes by 256 of D), each computed by one CTA. k-blocks whose dZ tile the
// filter skipped are neither loaded nor multiplied. Tiles run in groups of 8 output-row tiles that sweep every column
// tile, so that a group's A tiles are read from L2 by all of its column tiles. TMA writes (or adds) a tile where it
// goes to the fp32 carry, or to an output that takes no carry; the other cases run a coalesced epilogue through fp32
// staging. A launch of one product runs a CTA per tile; the two products of a dZ block share a launch, whose CTAs are
// persistent when TMA writes every tile of both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cce/detail/math.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/kernel/portable/element_run.cuh>
#include <cce/kernel/portable/grad_gemm.cuh>
#include <cce/kernel/sm90/logit_tile.cuh>
#include <cce/tile/tile_grid.hpp>

namespace cce::detail::sm90 {

using grad_gemm_shape = logit_tile_shape;
// Row pitch of the staged fp32 output tile. A half-warp's 8-byte fragment writes cover 4 rows of 8 floats: 8 floats
// of padding put them in 32 distinct banks (4 left two rows on each bank).
inline constexpr int staging_ld = grad_gemm_shape::bn + 8;
static_assert(std::size_t(grad_gemm_shape::bm) * staging_ld * sizeof(float) <=
                  std::size_t(grad_gemm_shape::stages) *
                      (grad_gemm_shape::a_bytes<__half> + grad_gemm_shape::b_bytes<__half>),
              "the staged tile fits in the ring");

// What TMA writes at the end of each tile of a launch (tma_store_tile), through grad_gemm_params_sm90::out_map: the
// uncompensated fp32 carry of a contribution before the last, or an output without compensation, low-rank term or
// row scatter: without a carry, or after the last contribution's carry, which TMA reads first (carry_map; not when
// gradients accumulate, whose 16-bit sum would then be rounded twice); nothing where the epilogue stages in fp32 and
// stores itself.
enum class tma_write : std::uint8_t { none, carry, output, output_after_carry };

// Where the compacted walk (plan.hpp) keeps the dZ tiles a product reads: tile (rt, ct) of 128 x 128 at slot
// walk.slot[rt ld + ct] of A's map, whose rows are the slots' rows one after another (dE: K-major, 128 classes deep;
// dC: MN-major, 128 classes wide). dE runs in parts (compact_part): its M tiles are parts, not row tiles. Null
// `walk.slot`: A is the product's own operand.
struct compact_slots {
  compact_walk_buffers walk;
  std::int64_t ld = 0;  // the flags' pitch: the problem's class tiles
};

static_assert(grad_gemm_shape::bm == compact_part_rows, "a dE part's sum is one M tile of the products");

// Part j of the compacted walk's dE: its row tile (-1 past the parts), its live tiles [lo, hi) in column order (their
// slots from first_slot + lo), and the fp32 row of its sum in the sums' map, -1 for a row tile in one part, which
// writes the output itself.
struct row_part {
  int row_tile = -1, first_slot = 0, lo = 0, hi = 0, sum_row = -1;

  __device__ __forceinline__ row_part(const compact_walk_buffers& c, int j) {
    if (j >= c.state[5]) return;
    const compact_part q = c.parts[j];
    const int live = c.row_live[q.row_tile], first_sum = c.row_sums[q.row_tile];
    row_tile = q.row_tile;
    first_slot = c.row_first[q.row_tile];
    if (first_sum < 0) {
      hi = live;
    } else {
      lo = q.part * int(compact_part_tiles);
      hi = live < lo + int(compact_part_tiles) ? live : lo + int(compact_part_tiles);
      sum_row = c.state[6] + (first_sum + q.part) * int(compact_part_rows);
    }
  }
  // Its k-blocks, two per live tile: [k_first(), k_end()).
  __device__ __forceinline__ int k_first() const { return 2 * lo; }
  __device__ __forceinline__ int k_end() const { return 2 * hi; }
};

// dE's tiles from the slots: k-block kb of a row tile's live tiles lies in slot first_slot + kb / 2, against the rows
// of C of that slot's class tile.
struct part_slots {
  int first_slot;
  const std::int32_t* slot_tile;
  __device__ __forceinline__ k_block_at operator()(int, int kb) const {
    constexpr int per_tile = grad_gemm_shape::filter_bn / grad_gemm_shape::bk;
    const int slot = first_slot + kb / per_tile, depth = kb % per_tile * grad_gemm_shape::bk;
    return {slot * grad_gemm_shape::bm, depth, slot_tile[slot] * grad_gemm_shape::filter_bn + depth};
  }
};

// dC's A tiles from the slots: the class tile's column of them, slot[rt ld] for row tile rt.
struct column_slots {
  const std::int32_t* slot;
  std::int64_t ld;
  __device__ __forceinline__ k_block_at operator()(int, int kb) const {
    constexpr int per_tile = grad_gemm_shape::filter_bn / grad_gemm_shape::bk;
    return {0, slot[kb / per_tile * ld] * grad_gemm_shape::filter_bn + kb % per_tile * grad_gemm_shape::bk,
            kb * grad_gemm_shape::bk};
  }
};

template <class T, class G>
struct grad_gemm_params_sm90 {
  operand_maps maps;
  grad_gemm_params<T, G, grad_gemm_shape::filter_bn> base;
  compact_slots compact{};  // persistent kernel only
  CUtensorMap sums_map;     // the compacted walk's dE: fp32 rows of D over dZ's buffer, where split parts add up
  int m_tiles = 0, n_tiles = 0;
  // Where the M tiles are counted on the device, m_tiles at most (the compacted walk's dE parts, which
  // walk_flags_kernel lays out): the persistent kernel takes that many, so that no CTA draws the parts that are not.
  const int* m_tiles_on_device = nullptr;
  // The K range in this many parts, each a tile of its own (persistent kernel only): every part adds its sum to the
  // carry (tma_write::carry onto zeros; two addends keep the sum independent of their order). With more than two,
  // parts 2j and 2j + 1 add to the j-th of the carries stacked `pair_rows` rows apart (out_map spans them all).
  int k_splits = 1;
  int pair_rows = 0;
  tma_write tma = tma_write::none;
  CUtensorMap out_map;    // in boxes of 128 rows by 128 bytes
  CUtensorMap carry_map;  // the same, of the carry read by tma_write::output_after_carry
  // Where the carry shares the output's buffer (grad_gemm_params::carry_shares_output): its second halves, while
  // out_map (tma_write::carry) or carry_map (output_after_carry) maps the first.
  CUtensorMap carry_halves_map;
  __host__ __device__ int tiles() const { return m_tiles * n_tiles * k_splits; }
  __device__ int m_tiles_now() const { return m_tiles_on_device ? *m_tiles_on_device : m_tiles; }
};

// Where consumer warp cw's lane holds its accumulators in the 128 x 256 tile (wgmma.cuh): rows row and row + 8,
// columns col + 8 j + 0..1.
struct accumulator_origin {
  int row, col;
  __device__ __forceinline__ accumulator_origin(int cw, int lane)
      : row((cw / 4) * 64 + (cw % 4) * 16 + lane / 4), col(2 * (lane % 4)) {}
};

static_assert(grad_gemm_shape::bn == shared_carry_tile, "a shared carry splits the products' output tiles");

// What TMA writes in the launch of `base` (grad_gemm_params_sm90::tma), and the maps it writes through and reads.
template <class T, class G, int KTile>
tma_write encode_output_map(CUtensorMap& map, CUtensorMap& carry_map, CUtensorMap& carry_halves_map,
                            const grad_gemm_params<T, G, KTile>& base) {
  constexpr std::uint32_t rows = grad_gemm_shape::bm;
  const auto encode_carry = [&](CUtensorMap& m, float* at, std::int64_t cols) {
    return tma_addressable(at, cols, sizeof(float)) &&
           encode_sw128(&m, at, cols, base.m, cols, tensor_map_type<float>, sizeof(float), rows);
  };
  const auto carry = [&](CUtensorMap& m) {
    if (base.comp != nullptr) return false;
    if (!base.carry_shares_output) return encode_carry(m, base.acc, base.n);
    return base.n % grad_gemm_shape::bn == 0 && base.ld_out == base.n &&
           encode_carry(m, reinterpret_cast<float*>(base.out), base.n / 2) &&
           encode_carry(carry_halves_map, base.acc, base.n / 2);
  };
  if (base.acc != nullptr && !base.last) return carry(map) ? tma_write::carry : tma_write::none;
  const bool output = base.comp == nullptr && base.rank == 0 && base.out_rows == nullptr &&
                      tma_addressable(base.out, base.ld_out, sizeof(G)) &&
                      encode_sw128(&map, base.out, base.n, base.m, base.ld_out, tensor_map_type<G>, sizeof(G), rows);
  if (!output) return tma_write::none;
  if (base.acc == nullptr) return tma_write::output;
  return !base.accumulate && carry(carry_map) ? tma_write::output_after_carry : tma_write::none;
}

// The thread that issued the bulk stores: returns once every group it committed has been read from shared memory.
__device__ __forceinline__ void staging_read() { cuda::ptx::cp_async_bulk_wait_group_read(cuda::ptx::n32_t<0>{}); }

// The layout of a 128 x 256 tile of E staged as TMA boxes of 128 rows by 128 bytes, as many at a time as
// StagingBytes hold (a group), in TMA's 128-byte swizzle: 16-byte chunk c of row r at chunk c ^ (r % 8), so that a
// warp's fragment accesses, 8 rows of 16 or 32 bytes, fill all 32 banks.
template <class E, std::uint32_t StagingBytes>
struct staged_boxes {
  static constexpr int box_bytes = grad_gemm_shape::bm * 128, box_cols = 128 / sizeof(E);
  static constexpr int boxes = grad_gemm_shape::bn / box_cols, fragments_per_box = box_cols / 8;
  static constexpr int per_group = int(StagingBytes / box_bytes) < boxes ? int(StagingBytes / box_bytes) : boxes;
  static_assert(per_group > 0 && boxes % per_group == 0, "whole groups of boxes");
  static constexpr int groups = boxes / per_group, fragments_per_group = per_group * fragments_per_box;
  // Where accumulator fragment j's column pair (accumulator_origin: the lane's columns col, col + 1 of each 8) of
  // tile row `row` lies in its group's staging.
  __device__ __forceinline__ static int offset(int j, int row, const accumulator_origin& origin) {
    const int byte = (8 * (j % fragments_per_box) + origin.col) * int(sizeof(E));
    return (j % fragments_per_group) / fragments_per_box * box_bytes + row * 128 + ((byte / 16) ^ (row % 8)) * 16 +
           byte % 16;
  }
  // The first column, in the tile, of box b of `group`.
  __device__ __forceinline__ static int box_col(int group, int b) { return box_cols * (group * per_group + b); }
};

// Where the box whose first column is c of the tile at col0 lies: in `map` at col0 + c, or, for an fp32 carry that
// shares the output's buffer (`halves` maps its second halves), in `map` at col0 / 2 + c for the tile's first 128
// columns and in `halves` at col0 / 2 + c - 128 for the rest.
struct box_target {
  const CUtensorMap* map;
  std::int32_t col;
  __device__ __forceinline__ box_target(const CUtensorMap* m, const CUtensorMap* halves, int col0, int c) {
    constexpr int half = grad_gemm_shape::bn / 2;
    map = halves != nullptr && c >= half ? halves : m;
    col = halves != nullptr ? col0 / 2 + c % half : col0 + c;
  }
};

// The tile's fp32 carry at (row0, col0), read by TMA through `staged` a group of boxes at a time (one thread arms
// `loaded`, whose parity every consumer thread tracks in `phase`), added to the thread's accumulators: the carry plus
// the last contribution, as the staged epilogue adds them. Every box is read before the function returns (`halves`:
// box_target).
template <std::uint32_t StagingBytes>
__device__ __forceinline__ void add_carry_tile(const CUtensorMap* map, const CUtensorMap* halves, unsigned char* staged,
                                               float (&acc)[128], int cw, int lane, int row0, int col0,
                                               std::uint64_t* loaded, std::uint32_t& phase) {
  using L = staged_boxes<float, StagingBytes>;
  const bool issuer = cw == 0 && lane == 0;
  const accumulator_origin origin(cw, lane);
#pragma unroll
  for (int group = 0; group < L::groups; ++group) {
    if (issuer) staging_read();
    consumer_barrier();  // the staging is free: stores read from it, and every consumer done with the last group
    if (issuer) {
      cuda::ptx::mbarrier_arrive_expect_tx(cuda::ptx::sem_release, cuda::ptx::scope_cta, cuda::ptx::space_shared,
                                           loaded, std::uint32_t(L::per_group * L::box_bytes));
#pragma unroll
      for (int b = 0; b < L::per_group; ++b) {
        const box_target box(map, halves, col0, L::box_col(group, b));
        tma_load_2d(staged + b * L::box_bytes, box.map, box.col, row0, loaded);
      }
    }
    wait_parity(loaded, phase);
    phase ^= 1u;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = origin.row + 8 * r;
#pragma unroll
      for (int j = group * L::fragments_per_group; j < (group + 1) * L::fragments_per_group; ++j) {
        const float2 c = *reinterpret_cast<const float2*>(staged + L::offset(j, row, origin));
        acc[4 * j + 2 * r] += c.x;
        acc[4 * j + 2 * r + 1] += c.y;
      }
    }
  }
  consumer_barrier();  // every consumer done reading before the staging is written again
}

// The consumers' epilogue under tma_write: the tile's 128 x 256 result in E (the output's G, or the carry's float)
// staged as staged_boxes in `staged`; one thread stores each group of boxes, or adds them to their target in L2
// (`add`; a 16-bit tile is rounded, then the sum, as a framework's `grad += g`). The consumers neither load the old
// values nor wait for the stores: the issuing thread waits only until the last group is read from shared memory,
// before the staging is written again (staging_read) and before the CTA exits. 4-10 % of the product launches of
// loss_and_grad, whose short dC tiles each add to the output (docs/performance.md). Each element takes one store or
// add per launch, in launch order, so the sums do not depend on timing (deterministic mode keeps them).
template <class E, std::uint32_t StagingBytes>
__device__ __forceinline__ void tma_store_tile(const CUtensorMap* map, unsigned char* staged, const float (&acc)[128],
                                               int cw, int lane, int row0, int col0, bool add,
                                               const CUtensorMap* halves = nullptr) {
  using L = staged_boxes<E, StagingBytes>;
  const bool issuer = cw == 0 && lane == 0;
  const accumulator_origin origin(cw, lane);
#pragma unroll
  for (int group = 0; group < L::groups; ++group) {
    if (issuer) staging_read();
    consumer_barrier();  // the staging is free: read by TMA, and (in the ring) done with by every consumer
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = origin.row + 8 * r;
#pragma unroll
      for (int j = group * L::fragments_per_group; j < (group + 1) * L::fragments_per_group; ++j) {
        unsigned char* at = staged + L::offset(j, row, origin);
        const float x0 = acc[4 * j + 2 * r], x1 = acc[4 * j + 2 * r + 1];
        if constexpr (std::is_same_v<E, float>) {
          *reinterpret_cast<float2*>(at) = make_float2(x0, x1);
        } else {
          const E pair[2] = {from_float<E>(x0), from_float<E>(x1)};
          *reinterpret_cast<std::uint32_t*>(at) = *reinterpret_cast<const std::uint32_t*>(pair);
        }
      }
    }
    cuda::ptx::fence_proxy_async(cuda::ptx::space_shared);
    consumer_barrier();
    if (issuer) {
#pragma unroll
      for (int b = 0; b < L::per_group; ++b) {
        const box_target box(map, halves, col0, L::box_col(group, b));
        const std::int32_t coords[2] = {box.col, row0};
        if (add)
          cuda::ptx::cp_reduce_async_bulk_tensor(cuda::ptx::space_global, cuda::ptx::space_shared, cuda::ptx::op_add,
                                                 box.map, coords, staged + b * L::box_bytes);
        else
          cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_global, cuda::ptx::space_shared, box.map, coords,
                                          staged + b * L::box_bytes);
      }
      cuda::ptx::cp_async_bulk_commit_group();
    }
  }
}

// The common case of the epilogue in 16-byte loads and stores: no Kahan compensation, no low-rank term, and runs
// of 4 columns that start 16-byte aligned in the carry and 4-element aligned in the output.
template <class T, class G, int KTile>
__device__ __forceinline__ bool vector_runs(const grad_gemm_params<T, G, KTile>& p) {
  return p.comp == nullptr && p.rank == 0 && p.n % 4 == 0 && p.ld_out % 4 == 0 && aligned_to(p.acc, 16) &&
         aligned_to(p.out, 4 * sizeof(G)) && aligned_to(p.baseline_term, 16);
}

// gradient_run's contract (load what the store needs first, then fold 4 columns into the carry or the output)
// under vector_runs().
template <class G>
struct vector_run {
  float4 carried;
  float prev[4];

  template <class T, int KTile>
  __device__ __forceinline__ void load(const grad_gemm_params<T, G, KTile>& p, std::int64_t row, std::int64_t col0) {
    carried = p.acc && !p.first ? *reinterpret_cast<const float4*>(p.acc + row * p.n + col0) : float4{};
    if (p.accumulate && p.last) load_run<4>(gradient_run<4, G>::output(p, row, col0), prev);
    else prev[0] = prev[1] = prev[2] = prev[3] = 0.f;
  }

  template <class T, int KTile>
  __device__ __forceinline__ void store(const grad_gemm_params<T, G, KTile>& p, std::int64_t row, std::int64_t col0,
                                        const float (&x)[4]) const {
    const float sum[4] = {carried.x + x[0], carried.y + x[1], carried.z + x[2], carried.w + x[3]};
    if (p.acc && !p.last) {
      *reinterpret_cast<float4*>(p.acc + row * p.n + col0) = make_float4(sum[0], sum[1], sum[2], sum[3]);
      return;
    }
    float4 total = make_float4(sum[0], sum[1], sum[2], sum[3]);
    if (p.baseline_term) {
      const float s = p.baseline_scale(row);
      const float4 t = *reinterpret_cast<const float4*>(p.baseline_term + col0);
      total = make_float4(sum[0] + s * t.x, sum[1] + s * t.y, sum[2] + s * t.z, sum[3] + s * t.w);
    }
    const float out[4] = {prev[0] + total.x, prev[1] + total.y, prev[2] + total.z, prev[3] + total.w};
    store_run<4>(gradient_run<4, G>::output(p, row, col0), out);
  }
};

// Rows first, first + row_step, ... of the staged tile (a thread's 4 columns from `staged`) into the gradient, the
// loads of `batch` rows ahead of their stores. Run is gradient_run<4, G> or vector_run<G>.
template <class Run, class T, class G, int KTile>
__device__ __forceinline__ void store_runs(const grad_gemm_params<T, G, KTile>& p, const float* staged, int first,
                                           int rows, std::int64_t row0, std::int64_t col0) {
  constexpr int row_step = logit_tile_shape::consumer_warps * 32 / 64, batch = 8;
#pragma unroll 1
  for (int r0 = first; r0 < rows; r0 += batch * row_step) {
    Run run[batch];
#pragma unroll
    for (int b = 0; b < batch; ++b)
      if (r0 + b * row_step < rows) run[b].load(p, row0 + r0 + b * row_step, col0);
#pragma unroll
    for (int b = 0; b < batch; ++b) {
      const int r = r0 + b * row_step;
      if (r >= rows) break;
      const float4 v = *reinterpret_cast<const float4*>(staged + r * staging_ld);
      const float x[4] = {v.x, v.y, v.z, v.w};
      run[b].store(p, row0 + r, col0, x);
    }
  }
}

// Tile `tile` (in launch order) of a product: where its output lies and which of its k-blocks are multiplied, the
// part `tile / (m_tiles n_tiles)` of a split K range (in whole filter tiles).
struct grad_tile {
  tile::grouped_order pos;
  active_k_tiles<grad_gemm_shape::filter_bn> active;
  int k_first, k_end;
  int part;  // of the K range

  // `m_tiles`: of the launch, where it differs from prm.m_tiles (m_tiles_now).
  template <class T, class G>
  __device__ __forceinline__ grad_tile(const grad_gemm_params_sm90<T, G>& prm, int tile, int m_tiles)
      : pos(tile % (m_tiles * prm.n_tiles), m_tiles, prm.n_tiles, 8), active(prm.base.active) {
    const int k_blocks = int(ceil_div(prm.base.k, std::int64_t(grad_gemm_shape::bk)));
    part = tile / (m_tiles * prm.n_tiles);
    const k_range range = k_part<grad_gemm_shape::filter_bn, grad_gemm_shape::bk>(k_blocks, prm.k_splits, part);
    k_first = range.first;
    k_end = range.end;
    active.fixed_tile = pos.m;
  }
  __device__ __forceinline__ int row0() const { return pos.m * grad_gemm_shape::bm; }
  __device__ __forceinline__ int col0() const { return pos.n * grad_gemm_shape::bn; }
  __device__ __forceinline__ int k_blocks() const { return k_end - k_first; }
  // The live k-blocks (2 per filter tile), walked by the producer thread alone or by every lane of a consumer warp.
  __device__ __forceinline__ auto loads() const { return active.template walk_alone<grad_gemm_shape::bk>(0, k_end); }
  __device__ __forceinline__ auto computes() const { return active.template walk<grad_gemm_shape::bk>(0, k_end); }
};

// The baseline term of grad_gemm_params into the thread's accumulators of the tile at (row0, col0).
template <class T, class G, int KTile>
__device__ __forceinline__ void add_baseline(const grad_gemm_params<T, G, KTile>& p, float (&acc)[128], int cw,
                                             int lane, std::int64_t row0, std::int64_t col0) {
  const accumulator_origin origin(cw, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t row = row0 + origin.row + 8 * r;
    if (row >= p.m) continue;
    const float s = p.baseline_scale(row);
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const std::int64_t col = col0 + origin.col + 8 * j + e;
        if (col < p.n) acc[4 * j + 2 * r + e] += s * p.baseline_term[col];
      }
  }
}

// The thread's accumulators of the tile at row0 times grad_gemm_params::row_scale.
template <class T, class G, int KTile>
__device__ __forceinline__ void scale_rows(const grad_gemm_params<T, G, KTile>& p, float (&acc)[128], int cw, int lane,
                                           std::int64_t row0) {
  const accumulator_origin origin(cw, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t row = row0 + origin.row + 8 * r;
    const float s = row < p.m ? p.row_scale[row] : 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) acc[4 * j + 2 * r + e] *= s;
  }
}

// The TMA epilogue of a tile of `prm` (prm.tma != none), staged in `staged`; the carry it reads completes on
// `carry_loaded`, whose parity the consumer threads track in `carry_phase`.
template <std::uint32_t StagingBytes, class T, class G>
__device__ __forceinline__ void tma_epilogue(const grad_gemm_params_sm90<T, G>& prm, const grad_tile& t,
                                             unsigned char* staged, float (&acc)[128], int cw, int lane,
                                             std::uint64_t* carry_loaded, std::uint32_t& carry_phase) {
  const CUtensorMap* halves = prm.base.carry_shares_output ? &prm.carry_halves_map : nullptr;
  if (prm.tma == tma_write::carry) {
    const int row0 = t.row0() + (t.part / 2) * prm.pair_rows;
    tma_store_tile<float, StagingBytes>(&prm.out_map, staged, acc, cw, lane, row0, t.col0(), !prm.base.first, halves);
  } else {
    if (prm.tma == tma_write::output_after_carry)
      add_carry_tile<StagingBytes>(&prm.carry_map, halves, staged, acc, cw, lane, t.row0(), t.col0(), carry_loaded,
                                   carry_phase);
    if (prm.base.baseline_term) add_baseline(prm.base, acc, cw, lane, t.row0(), t.col0());
    tma_store_tile<G, StagingBytes>(&prm.out_map, staged, acc, cw, lane, t.row0(), t.col0(), prm.base.accumulate);
  }
}

// Output tile `tile` (in launch order) of the product `prm`, by the whole CTA.
template <class T, class G, major MajorA>
__device__ __forceinline__ void grad_gemm_tile(const grad_gemm_params_sm90<T, G>& prm, int tile) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = grad_gemm_shape;
  using ring_type = tile_ring<T, MajorA, major::mn>;
  // Only the sm_90a image has this body (and static shared memory: the host checks for it, dispatch/sm90.cuh).
  extern __shared__ unsigned char smem_raw[];
  __shared__ stage_barriers<S::stages> bars;
  __shared__ std::uint64_t carry_loaded;

  const auto& p = prm.base;
  if (p.disabled()) return;
  const grad_tile t(prm, tile, prm.m_tiles);
  if (p.below_diagonal(t.row0(), t.col0(), S::bn) || adds_nothing(p, census(p, t.active))) return;

  if (threadIdx.x == 0) {
    cuda::ptx::mbarrier_init(&carry_loaded, 1);
    bars.init(S::consumer_warps);  // and the fence that makes both visible
  }
  __syncthreads();
  const ring_type ring(smem_raw, bars);

  if (threadIdx.x / 128 == 0) {  // producer
    shrink_registers<S::producer_registers>();
    if (threadIdx.x == 0) {
      ring_position<S::stages> at;
      ring.load_tile(at, &prm.maps, t.row0(), t.col0(), t.k_end, t.loads(), t.k_first);
    }
    return;
  }

  grow_registers<S::consumer_registers>();
  const int cw = threadIdx.x / 32 - 4;  // consumer warp
  const int lane = threadIdx.x % 32;
  float acc[128];
  ring_position<S::stages> at;
  ring.compute_tile(acc, at, t.k_end, cw / 4, t.computes(), t.k_first);
  if (p.row_scale) scale_rows(p, acc, cw, lane, t.row0());

  if (prm.tma != tma_write::none) {  // staged in the ring, which every consumer is done with
    std::uint32_t carry_phase = 0;
    tma_epilogue<ring_type::bytes>(prm, t, reinterpret_cast<unsigned char*>(ring.staging_area()), acc, cw, lane,
                                   &carry_loaded, carry_phase);
    if (cw == 0 && lane == 0) staging_read();
    return;
  }
  // Otherwise the epilogue goes through shared memory too (the ring's buffers, free once both warpgroups are done
  // with them), in fp32, so that it runs as a short loop of coalesced 4-column runs rather than 128 scattered
  // elements per thread: 256 threads, 64 runs of 4 columns per row, 4 rows per pass.
  const int col = 4 * ((threadIdx.x - 128) % 64);
  const std::int64_t row0 = t.row0(), col0 = std::int64_t(t.col0()) + col;
  const int rows = int(p.m - row0 < S::bm ? p.m - row0 : S::bm);
  consumer_barrier();
  float* staged = ring.staging_area();
  const accumulator_origin origin(cw, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < 32; ++j)
      *reinterpret_cast<float2*>(staged + (origin.row + 8 * r) * staging_ld + 8 * j + origin.col) =
          make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
  consumer_barrier();

  if (col0 >= p.n) return;
  const float* from = staged + col;
  const int first = (int(threadIdx.x) - 128) / 64;
  if (vector_runs(p))  // the loads of `batch` passes ahead of their stores
    store_runs<vector_run<G>>(p, from, first, rows, row0, col0);
  else
    store_runs<gradient_run<4, G>>(p, from, first, rows, row0, col0);
#endif
}

template <class T, class G, major MajorA>
__global__ void __launch_bounds__(grad_gemm_shape::threads, 1)
    grad_gemm_kernel(const __grid_constant__ grad_gemm_params_sm90<T, G> prm) {
  grad_gemm_tile<T, G, MajorA>(prm, int(blockIdx.x));
}

// dE = dZ C and dC = dZ^T E of one dZ block in one launch: the tiles of the product with the deeper K first (dE's K
// is the block's classes, dC's its rows), then the other's, which fill the SMs the last wave of deep tiles leaves
// idle. Separate launches would idle them: a row block of 2,048 rows at D = 2,304 has 144 dE tiles, 1.09 waves on
// 132 SMs. In the other order the deep tiles would start last and hold the launch (minimal's carried pass on gpt2:
// dC's tiles 128 k-blocks deep, dE's 62). The persistent kernel also runs a single product, in the slot of its A
// operand's major (`de`: K-major, `dc`: MN-major), the other without tiles.
template <class T, class G>
struct grad_gemm_pair_params_sm90 {
  grad_gemm_params_sm90<T, G> de, dc;
  int* queue = nullptr;   // grad_gemm_persistent_kernel: the next tile to take, 0 at launch
  bool dc_first = false;  // dC's tiles run deeper: they come first
  __host__ __device__ int tiles() const { return de.tiles() + dc.tiles(); }
};

// Where position `tile` of a pair's launch order lies: in dE or dC, and at which of its tiles.
struct pair_entry {
  bool de;
  int index;
  __host__ __device__ pair_entry(int tile, int de_tiles, int dc_tiles, bool dc_first) {
    const int first = dc_first ? dc_tiles : de_tiles;
    de = (tile < first) != dc_first;
    index = tile < first ? tile : tile - first;
  }
};

template <class T, class G>
__global__ void __launch_bounds__(grad_gemm_shape::threads, 1)
    grad_gemm_pair_kernel(const __grid_constant__ grad_gemm_pair_params_sm90<T, G> prm) {
  const pair_entry e(int(blockIdx.x), prm.de.tiles(), prm.dc.tiles(), prm.dc_first);
  if (e.de)
    grad_gemm_tile<T, G, major::k>(prm.de, e.index);
  else
    grad_gemm_tile<T, G, major::mn>(prm.dc, e.index);
}

// The pair, or a single product (the first-order share's), when TMA writes every tile: one CTA per SM takes tiles
// from a queue in launch order (an atomic counter: dE tiles run the whole vocabulary deep, dC tiles a block of rows,
// so a fixed share per CTA would leave the CTAs that drew two dE tiles running long after the others), on a ring of
// 3 stages with a staging area of its own beside it. The producer then loads the next tile while the consumers stage
// and store one, and no CTA launch, barrier setup or empty ring lies between tiles: each of loss_and_grad's dC tiles
// is 32 k-blocks deep on gemma2, and those costs were about a tenth of its time (docs/performance.md).
struct persistent_shape {
  static constexpr int stages = 3;
  static constexpr std::uint32_t staging_bytes = 4 * grad_gemm_shape::bm * 128;  // the 16-bit tile; fp32 in halves
  template <class T>
  static constexpr std::size_t smem_bytes = tile_ring<T, major::k, major::mn, 1, stages>::bytes + staging_bytes + 1024;
};

// The tile ids the producer hands the consumers, in a ring of two slots.
struct tile_handoff {
  std::uint64_t full[2], empty[2];
  int tile[2];
};

// Whether tile t of product q is left alone: the product is off (as its rows decided on the device), or t lies below
// the diagonal of a symmetric product's upper part. Producer and consumers pass over it alike.
template <class T, class G>
__device__ __forceinline__ bool left_alone(const grad_gemm_params_sm90<T, G>& q, const grad_tile& t) {
  return q.base.disabled() || q.base.below_diagonal(t.row0(), t.col0(), grad_gemm_shape::bn);
}

template <class T, class G>
__global__ void __launch_bounds__(grad_gemm_shape::threads, 1)
    grad_gemm_persistent_kernel(const __grid_constant__ grad_gemm_pair_params_sm90<T, G> prm) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = grad_gemm_shape;
  using P = persistent_shape;
  using de_ring = tile_ring<T, major::k, major::mn, 1, P::stages>;
  using dc_ring = tile_ring<T, major::mn, major::mn, 1, P::stages>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ stage_barriers<P::stages> bars;
  __shared__ tile_handoff handoff;
  __shared__ std::uint64_t carry_loaded;
  // Nothing to walk through where the products have no tiles or the rows turned them off (every thread reads the
  // same).
  const auto idle = [](const grad_gemm_params_sm90<T, G>& q) {
    return q.tiles() == 0 || q.base.disabled();
  };
  if (idle(prm.de) && idle(prm.dc)) return;

  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      cuda::ptx::mbarrier_init(&handoff.full[s], 1);
      cuda::ptx::mbarrier_init(&handoff.empty[s], S::consumer_warps * 32);
    }
    cuda::ptx::mbarrier_init(&carry_loaded, 1);
    bars.init(S::consumer_warps);  // and the fence that makes every barrier visible
  }
  __syncthreads();
  const de_ring ring_de(smem_raw, bars);
  const dc_ring ring_dc(smem_raw, bars);
  const int de_m_tiles = prm.de.m_tiles_now(), dc_m_tiles = prm.dc.m_tiles_now();
  const int de_tiles = de_m_tiles * prm.de.n_tiles * prm.de.k_splits;
  const int dc_tiles = dc_m_tiles * prm.dc.n_tiles * prm.dc.k_splits, tiles = de_tiles + dc_tiles;

  if (threadIdx.x / 128 == 0) {  // producer
    shrink_registers<S::producer_registers>();
    if (threadIdx.x == 0) {
      ring_position<P::stages> at;
      for (int i = 0;; ++i) {
        const int tile = atomicAdd(prm.queue, 1), slot = i % 2;
        wait_parity(&handoff.empty[slot], ((i / 2) & 1) ^ 1u);  // a fresh barrier counts as freed on the first lap
        handoff.tile[slot] = tile;
        cuda::ptx::mbarrier_arrive(&handoff.full[slot]);  // releases the store above to the consumers' wait
        if (tile >= tiles) break;
        const pair_entry e(tile, de_tiles, dc_tiles, prm.dc_first);
        if (e.de) {
          const grad_tile t(prm.de, e.index, de_m_tiles);
          const compact_walk_buffers& c = prm.de.compact.walk;
          if (left_alone(prm.de, t)) continue;
          if (c.slot) {
            const row_part part(c, t.pos.m);
            if (part.row_tile >= 0)
              ring_de.load_tile(at, &prm.de.maps, 0, t.col0(), part.k_end(), every_k_block{}, part.k_first(),
                                part_slots{part.first_slot, c.slot_tile});
          } else {
            ring_de.load_tile(at, &prm.de.maps, t.row0(), t.col0(), t.k_end, t.loads(), t.k_first);
          }
        } else {
          const grad_tile t(prm.dc, e.index, dc_m_tiles);
          const compact_slots& c = prm.dc.compact;
          if (left_alone(prm.dc, t)) continue;
          if (c.walk.slot)
            ring_dc.load_tile(at, &prm.dc.maps, t.row0(), t.col0(), t.k_end, t.loads(), t.k_first,
                              column_slots{c.walk.slot + t.pos.m, c.ld});
          else
            ring_dc.load_tile(at, &prm.dc.maps, t.row0(), t.col0(), t.k_end, t.loads(), t.k_first);
        }
      }
    }
    return;
  }

  grow_registers<S::consumer_registers>();
  const int cw = threadIdx.x / 32 - 4;  // consumer warp
  const int lane = threadIdx.x % 32;
  unsigned char* staged = reinterpret_cast<unsigned char*>(ring_de.staging_area()) + de_ring::bytes;
  float acc[128];
  ring_position<P::stages> at;
  std::uint32_t carry_phase = 0;
  for (int i = 0;; ++i) {
    const int slot = i % 2;
    wait_parity(&handoff.full[slot], (i / 2) & 1);
    const int tile = *static_cast<volatile int*>(&handoff.tile[slot]);
    cuda::ptx::mbarrier_arrive(&handoff.empty[slot]);  // every reader releases its own read
    if (tile >= tiles) break;
    const pair_entry e(tile, de_tiles, dc_tiles, prm.dc_first);
    const bool de = e.de;
    const grad_gemm_params_sm90<T, G>& q = de ? prm.de : prm.dc;
    grad_tile t(q, e.index, de ? de_m_tiles : dc_m_tiles);
    if (left_alone(q, t)) continue;
    if (de && q.compact.walk.slot) {  // a part of the compacted walk's dE: its output, or its sum
      const row_part part(q.compact.walk, t.pos.m);
      if (part.row_tile < 0) continue;
      ring_de.compute_tile(acc, at, part.k_end(), cw / 4, every_k_block{}, part.k_first());
      if (part.sum_row >= 0) {
        tma_store_tile<float, P::staging_bytes>(&q.sums_map, staged, acc, cw, lane, part.sum_row, t.col0(), false);
        continue;
      }
      t.pos.m = part.row_tile;
      tma_epilogue<P::staging_bytes>(q, t, staged, acc, cw, lane, &carry_loaded, carry_phase);
      continue;
    }
    const int computed = de ? ring_de.compute_tile(acc, at, t.k_end, cw / 4, t.computes(), t.k_first)
                            : ring_dc.compute_tile(acc, at, t.k_end, cw / 4, t.computes(), t.k_first);
    if (adds_nothing(q.base, k_tile_census{computed > 0, computed == t.k_blocks()})) continue;
    if (q.base.row_scale) scale_rows(q.base, acc, cw, lane, t.row0());
    tma_epilogue<P::staging_bytes>(q, t, staged, acc, cw, lane, &carry_loaded, carry_phase);
  }
  if (cw == 0 && lane == 0) staging_read();  // before the CTA's shared memory goes
#endif
}

// The compacted walk's dE of the row tiles in several parts: their fp32 sums (grad_gemm_params_sm90::sums_map's rows)
// added in part order, the baseline term as add_baseline adds it, then into the output as the products' TMA epilogue
// writes it (added to it when gradients accumulate).
template <class G>
struct part_sums_params {
  const float* sums = nullptr;  // dZ's buffer as fp32 rows of D
  compact_slots compact;
  std::int64_t n = 0, d = 0, ld_out = 0;
  G* out = nullptr;
  bool accumulate = false;
  const float* baseline_rows = nullptr;  // grad_gemm_params's
  const float* baseline_term = nullptr;
};

template <class G>
__global__ void __launch_bounds__(256) compact_part_sums_kernel(const __grid_constant__ part_sums_params<G> prm) {
  const compact_walk_buffers& c = prm.compact.walk;
  // Nothing to add where the chunk walk ran or no row tile was split (a part per row tile).
  if (c.state[2] == 0 || c.state[5] == ceil_div(prm.n, grad_gemm_shape::bm)) return;
  const std::int64_t quads = prm.d / 4;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < prm.n * quads;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / quads, col = 4 * (i % quads);
    const int rt = int(row / grad_gemm_shape::bm), first = c.row_sums[rt];
    if (first < 0) continue;
    const int parts = int(ceil_div(std::int64_t(c.row_live[rt]), compact_part_tiles));
    float total[4] = {0.f, 0.f, 0.f, 0.f};
    for (int p = 0; p < parts; ++p) {
      const std::int64_t sum_row = c.state[6] + (first + p) * compact_part_rows + row % compact_part_rows;
      const float4 v = *reinterpret_cast<const float4*>(prm.sums + sum_row * prm.d + col);
      total[0] += v.x;
      total[1] += v.y;
      total[2] += v.z;
      total[3] += v.w;
    }
    G* out = prm.out + row * prm.ld_out + col;
    const float s = prm.baseline_rows ? prm.baseline_rows[row] : 1.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (prm.baseline_term) total[e] += s * prm.baseline_term[col + e];
      const G rounded = from_float<G>(total[e]);
      out[e] = prm.accumulate ? from_float<G>(to_float(out[e]) + to_float(rounded)) : rounded;
    }
  }
}

}  // namespace cce::detail::sm90
