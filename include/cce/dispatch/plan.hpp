// The execution plan of one problem: tile grid, forward split-V factor, backward chunking and the layouts of the
// `saved` and `workspace` buffers. Host-only and shared by the GPU dispatch and the CPU tiled executor, so both
// run the same blockwise algorithm over the same buffers, and size queries carve exactly what calls use.
//
// Backward operating points (docs/api.md):
//   chunked  one row block (all N rows); vocab chunks of `chunk_cols`. Per chunk: dZ (N x chunk) -> dE += dZ C_chunk
//            (fp32 accumulator across chunks) and dC_chunk = dZ^T E written once. 4 GEMM-equivalents with the forward.
//   minimal  row blocks of `row_block` rows. Pass 1, per row block and chunk: dZ -> dE_block += dZ C_chunk.
//            Pass 2, per chunk and row block: dZ -> dC_chunk += dZ^T E_block. 5 GEMM-equivalents, O(row_block * D +
//            chunk * D) memory whatever N and V are.
// Both visit tiles in a fixed order and own every output element in one CTA per launch: no atomics.
//
// Vocabulary sorting (options::vocab_sort): the backward first orders the classes by a key (their average logit
// over the kept rows, docs/api.md), then walks vocab chunks in that order. Each chunk's classifier rows (and bias,
// class weights, low-rank B rows) are gathered into chunk buffers so the tile kernels read a contiguous slice;
// class gradients are scattered back to the original rows by the products' epilogues.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cce/detail/carve.hpp>
#include <cce/epilogue/row_loss.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/options.hpp>
#include <cce/tile/tile_grid.hpp>

namespace cce {

// What the size queries need to know about the device.
struct device_info {
  int arch = 0;            // compute capability, e.g. 80, 90
  int sm_count = 1;
};

namespace detail {

// Per-row constants of the backward: dz_v from `dz` with p_v = exp(z_v - lse). `lse_others` is the log of the
// row's non-target mass on the logit scale (lse + log(1 - p_y)): the gradient filter compares tile logits with it,
// so what a skipped tile drops is small against the row's own gradient (which is tiny when p_y is near 1).
struct row_coefficients {
  dlogit_coefficients dz{};
  float lse = 0.f;
  float lse_others = 0.f;
  std::int32_t target = -1;  // the target's column in this vocabulary slice, -1 when it has none there
  bool kept = false;         // the row contributes gradient
};

template <class T>
struct forward_buffers {
  row_partial* partials = nullptr;  // N x splits
  float* target_logit = nullptr;    // N: z_y of kept rows
  float* block_sums = nullptr;      // 2 x finalise_blocks: (loss, weight) per finaliser block
  float* lora_p = nullptr;          // N x r: scale * E A^T
};

template <class T>
struct backward_buffers {
  row_coefficients* coef = nullptr;  // N
  T* dz = nullptr;                   // row_block x chunk_cols
  std::uint8_t* active = nullptr;    // (row_block / bm) x (chunk_cols / bn): tile computed (not filtered)
  float* de_acc = nullptr;           // row_block x D, when a row block spans several chunks
  float* de_comp = nullptr;          // Kahan compensation of de_acc
  float* dc_acc = nullptr;           // chunk_cols x D, minimal mode (the same memory as de_acc: pass 2 runs after 1)
  float* dc_comp = nullptr;
  float* dbias_partial = nullptr;  // row_tiles x chunk_cols
  float* lora_p = nullptr;         // N x r
  float* lora_q = nullptr;         // N x r: draw B
  float* db_acc = nullptr;         // chunk_cols x r: dB carried over row blocks
  // Vocabulary sorting only.
  float* mean_partial = nullptr;      // mean_splits x (D + 1): column sums of kept rows of E, then their count
  float* key_inputs = nullptr;        // D + 1 + r: the mean row e_bar, the kept count, then scale * A e_bar
  float* sort_keys[2] = {};           // V each: the key, and the sort's second buffer
  std::int32_t* sort_values[2] = {};  // V each: class ids; after the sort one of them is `order`
  void* sort_temp = nullptr;          // plan::sort_temp bytes of the device sort's scratch
  std::int32_t* position = nullptr;   // V: class -> sorted position (the inverse of order)
  T* c_sorted = nullptr;              // chunk_cols x D: the chunk's classifier rows, in walk order
  T* bias_sorted = nullptr;           // chunk_cols
  float* weights_sorted = nullptr;    // chunk_cols
  T* b_sorted = nullptr;              // chunk_cols x r
};

struct saved_buffers {
  float* lse = nullptr;                 // N
  float* weight_sum = nullptr;          // 1: sum of w_y over kept rows (the mean's normaliser)
  float* class_weight_total = nullptr;  // 1: W = sum_v w_v (V without class weights)
  float* lse_others = nullptr;          // N: log-sum-exp of the non-target classes (lse for rows without a target)
  float* tile_max = nullptr;            // row_tiles x col_tiles: max logit of each tile, for the gradient filter
};

struct plan {
  std::int64_t n = 0, d = 0, v = 0, rank = 0;
  tile::tile_grid grid{};   // N x V in bm x bn tiles
  std::int64_t splits = 1;  // forward vocab splits
  backward_mode mode = backward_mode::chunked;
  std::int64_t row_block = 0;   // rows per backward row block (multiple of bm unless it is N)
  std::int64_t chunk_cols = 0;  // classes per backward chunk (multiple of bn)
  bool filter = false;
  bool bias = false;
  bool kahan = false;
  bool sort = false;             // options::vocab_sort
  bool weights = false;          // class weights are gathered with the sorted chunks
  std::size_t sort_temp = 0;     // scratch of the device sort, at least 1 byte with vocab_sort
  std::int64_t mean_splits = 1;  // row splits of the column mean of E
  std::size_t elem_bytes = 2;
  int sm_count = 1;              // of the device planned for: persistent grids take one CTA per SM
  static constexpr int finalise_threads = 256;

  std::int64_t finalise_blocks() const { return ceil_div(n, finalise_threads); }
  std::int64_t chunks() const { return ceil_div(v, chunk_cols); }
  std::int64_t row_blocks() const { return ceil_div(n, row_block); }
  bool needs_de_acc() const { return chunks() > 1; }

  saved_buffers carve_saved(void* base, std::size_t* bytes = nullptr) const {
    carver c(base);
    saved_buffers s;
    s.lse = c.take<float>(n);
    s.weight_sum = c.take<float>(1);
    s.class_weight_total = c.take<float>(1);
    s.lse_others = c.take<float>(n);
    s.tile_max = c.take<float>(filter ? grid.tiles() : 0);
    if (bytes) *bytes = c.bytes();
    return s;
  }

  template <class T>
  forward_buffers<T> carve_forward(void* base, std::size_t* bytes = nullptr) const {
    carver c(base);
    forward_buffers<T> f;
    f.partials = c.take<row_partial>(n * splits);
    f.target_logit = c.take<float>(n);
    f.block_sums = c.take<float>(2 * finalise_blocks());
    f.lora_p = c.take<float>(n * rank);
    if (bytes) *bytes = c.bytes();
    return f;
  }

  template <class T>
  backward_buffers<T> carve_backward(void* base, std::size_t* bytes = nullptr) const {
    carver c(base);
    backward_buffers<T> b;
    const std::int64_t block_rows = std::min(row_block, n);
    b.coef = c.take<row_coefficients>(n);
    b.dz = c.take<T>(block_rows * chunk_cols);
    b.active = c.take<std::uint8_t>(ceil_div(block_rows, grid.bm) * (chunk_cols / grid.bn));
    // The dE carry (a row block over its chunks) and the dC carry (a chunk over its row blocks, minimal mode only)
    // belong to passes that run one after the other: they share one region.
    const std::int64_t de_carry = needs_de_acc() ? block_rows * d : 0, dc_carry = row_blocks() > 1 ? chunk_cols * d : 0;
    float* carry = c.take<float>(std::max(de_carry, dc_carry));
    float* carry_comp = c.take<float>(kahan ? std::max(de_carry, dc_carry) : 0);
    if (de_carry > 0) {
      b.de_acc = carry;
      b.de_comp = carry_comp;
    }
    if (dc_carry > 0) {
      b.dc_acc = carry;
      b.dc_comp = carry_comp;
    }
    b.db_acc = c.take<float>(chunk_cols * rank);
    b.dbias_partial = c.take<float>(bias ? grid.row_tiles() * chunk_cols : 0);
    b.lora_p = c.take<float>(n * rank);
    b.lora_q = c.take<float>(n * rank);
    if (sort) {
      b.mean_partial = c.take<float>(mean_splits * (d + 1));
      b.key_inputs = c.take<float>(d + 1 + rank);
      for (int i = 0; i < 2; ++i) b.sort_keys[i] = c.take<float>(v);
      for (int i = 0; i < 2; ++i) b.sort_values[i] = c.take<std::int32_t>(v);
      b.sort_temp = c.take<unsigned char>(sort_temp);
      b.position = c.take<std::int32_t>(v);
      b.c_sorted = c.take<T>(chunk_cols * d);
      b.bias_sorted = c.take<T>(bias ? chunk_cols : 0);
      b.weights_sorted = c.take<float>(weights ? chunk_cols : 0);
      b.b_sorted = c.take<T>(chunk_cols * rank);
    }
    if (bytes) *bytes = c.bytes();
    return b;
  }

  std::size_t saved_bytes() const {
    std::size_t b = 0;
    carve_saved(nullptr, &b);
    return b;
  }
  template <class T>
  std::size_t workspace_bytes() const {
    std::size_t f = 0, b = 0;
    carve_forward<T>(nullptr, &f);
    carve_backward<T>(nullptr, &b);
    return std::max(f, b);  // forward and backward reuse the same workspace
  }
};

// Tiles over which the gradient filter bounds a row's skipped mass: the problem's own and, for a vocabulary shard,
// one per class held elsewhere (their tiling is unknown here, and no tile is smaller than a class).
inline std::int64_t filter_tiles(const tile::tile_grid& g, std::int64_t total_classes) {
  return g.col_tiles() + (total_classes - g.cols);
}

// Rows each block of the column mean of E sums (the split count is fixed by N, so the sum order is too).
inline constexpr std::int64_t mean_rows_per_split = 512;

// Plan for a problem: `bm` x `bn` logit tiles, a workspace budget in bytes (0: the default of the mode).
// `weights`: the problem has class weights; `sort_temp`: bytes of the device sort's scratch for V keys (what the
// GPU path's sort asks for; 0 on the host), used with options::vocab_sort; `forward_ctas_per_sm`: the forward
// grid's target (tile::policy::forward_ctas_per_sm).
template <class T>
plan make_plan(std::int64_t n, std::int64_t d, std::int64_t v, std::int64_t rank, bool bias, const options& opt, int bm,
               int bn, const device_info& dev, std::size_t budget, bool weights = false, std::size_t sort_temp = 0,
               int forward_ctas_per_sm = 16) {
  plan p;
  p.n = n;
  p.d = d;
  p.v = v;
  p.rank = rank;
  p.grid = tile::tile_grid{n, v, bm, bn};
  p.filter = opt.filter != filter_mode::none;
  p.bias = bias;
  p.kahan = opt.accum == accumulation::kahan;
  p.sort = opt.vocab_sort;
  p.weights = weights;
  p.sort_temp = opt.vocab_sort ? std::max<std::size_t>(sort_temp, 1) : 0;  // a null scratch means a size query
  p.mean_splits = std::clamp<std::int64_t>(ceil_div(n, mean_rows_per_split), 1, 64);
  p.elem_bytes = sizeof(T);
  p.sm_count = std::max(dev.sm_count, 1);

  // Forward: split the vocabulary until the grid holds about `forward_ctas_per_sm` CTAs per SM, so that the last
  // partial wave costs little (with two resident CTAs per SM and 1.2 waves, half the second wave's time is idle).
  const std::int64_t target_ctas = std::int64_t(std::max(forward_ctas_per_sm, 1)) * std::max(dev.sm_count, 1);
  // (N = 0 has no row tile: one split, and no division by zero.)
  p.splits = std::clamp<std::int64_t>(ceil_div(target_ctas, std::max<std::int64_t>(p.grid.row_tiles(), 1)), 1,
                                      p.grid.col_tiles());

  const std::size_t minimal_budget = std::size_t(64) << 20, chunked_budget = std::size_t(256) << 20;
  backward_mode mode = opt.backward_mode;
  if (mode == backward_mode::loss_and_grad) mode = backward_mode::chunked;
  if (budget == 0) budget = mode == backward_mode::minimal ? minimal_budget : chunked_budget;

  // Chunked first (fewer GEMM-equivalents): the widest vocab chunk whose buffers fit the budget. Unless the chunk
  // is so narrow (many rows against the budget) that dC_chunk = dZ^T E has fewer tiles than the GPU has SMs: that
  // GEMM would run its N-deep reduction on part of the GPU, once per chunk, and the row blocks of `minimal` do the
  // same work with every SM busy (measured on H100, gpt2 shape at N = 65,536: 450 ms chunked, 120 ms minimal).
  const std::int64_t max_chunk = round_up(v, bn);
  auto fits = [&](plan candidate) { return candidate.workspace_bytes<T>() <= budget; };
  auto fills_gpu = [&](std::int64_t cols) {
    return cols >= max_chunk || ceil_div(cols, bm) * ceil_div(d, bn) >= std::max(dev.sm_count, 1);
  };
  if (mode != backward_mode::minimal || n <= bm) {
    p.mode = backward_mode::chunked;
    p.row_block = std::max<std::int64_t>(n, 1);
    for (std::int64_t cols = max_chunk; cols >= bn; cols = cols > 2 * bn ? round_up(cols / 2, bn) : cols - bn) {
      p.chunk_cols = cols;
      if (!fits(p)) continue;
      if (fills_gpu(cols) || n <= bm) return p;
      break;
    }
  }
  // Minimal: shrink row blocks and chunks together until the fixed-size buffers fit.
  p.mode = backward_mode::minimal;
  p.row_block = std::min(round_up(n, bm), std::int64_t(4096));
  p.chunk_cols = std::min(max_chunk, std::int64_t(4096));
  while (!fits(p) && (p.row_block > bm || p.chunk_cols > bn)) {
    if (p.row_block >= p.chunk_cols && p.row_block > bm) p.row_block = round_up(p.row_block / 2, bm);
    else p.chunk_cols = round_up(p.chunk_cols / 2, bn);
  }
  if (p.row_block >= n) {  // one row block is the chunked schedule
    p.row_block = n;
    p.mode = backward_mode::chunked;
  }
  return p;
}

}  // namespace detail
}  // namespace cce
