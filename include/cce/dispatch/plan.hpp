// The execution plan of one problem: tile grid, forward split-V factor, backward blocking and the layouts of the
// `saved` and `workspace` buffers. Host-only and shared by the GPU dispatch and the CPU tiled executor, so both
// run the same blockwise algorithm over the same buffers, and size queries carve exactly what calls use.
//
// Backward operating points (docs/api.md). The backward walks dZ blocks of a pass_shape (rows x vocab columns):
//   chunked  one fused pass of blocks N x chunk. Per chunk: dZ -> dE += dZ C_chunk (fp32 carry across chunks)
//            and dC_chunk = dZ^T E written once. 4 GEMM-equivalents with the forward.
//   minimal  two passes, each with its own block shape. Pass 1, per row block and chunk: dZ -> dE_block += dZ
//            C_chunk. Pass 2, per chunk and row block: dZ -> dC_chunk += dZ^T E_block. 5 GEMM-equivalents, memory
//            bounded whatever N and V are. The passes run one after the other and share one region of the workspace,
//            so each may use all of it: pass 1 short row blocks over wide chunks (its carry is rows x D), pass 2
//            narrow chunks over tall row blocks (its carry is chunk x D, none when a block holds all N rows).
//            Where the call overwrites a contiguous dC (known at the call; the plan holds both schedules), dE's fp32
//            carry may live in dC's own buffer instead (plan::carried_pass): chunked's fused pass on chunks that fit
//            the budget, the chunks whose dC rows lie under the carry walked last and without dC; once the last of
//            them has written dE, their dZ is recomputed for dC alone. 4 GEMM-equivalents plus those chunks' share
//            of one (2N of V classes for 16-bit T, rounded up to chunks: 8-15 % on the large benchmark shapes).
//   kept     loss_and_grad only (the sm_90a forward writes the logit tiles): row blocks of N, each over every class.
//            Per block: forward storing the logits (fp16, relative to a per-(row, 256-class tile) reference) into the
//            dZ block, the rows' statistics, dZ in place, dE_block = dZ C and dC += dZ^T E_block. 3
//            GEMM-equivalents; dC is added to the output once per row block (no N x V or V x D carry).
// All visit blocks in a fixed order and own every output element in one CTA per launch: no atomics.
//
// Vocabulary sorting (options::vocab_sort): the backward first orders the classes by a key (their average logit
// over the kept rows, docs/api.md), then walks vocab chunks in that order. Each chunk's classifier rows (and bias,
// class weights, low-rank B rows) are gathered into chunk buffers so the tile kernels read a contiguous slice;
// class gradients are scattered back to the original rows by the products' epilogues.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include <cce/detail/carve.hpp>
#include <cce/epilogue/row_loss.hpp>
#include <cce/epilogue/row_partial.hpp>
#include <cce/kernel/sm90/forward_units.hpp>
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

// A backward pass's dZ block: `rows` (a multiple of bm, or all N) by `cols` classes (a multiple of bn).
struct pass_shape {
  std::int64_t rows = 0, cols = 0;

  bool operator==(const pass_shape& o) const { return rows == o.rows && cols == o.cols; }
};

// The buffers of one backward pass, all in the region the passes share.
template <class T>
struct pass_buffers {
  pass_shape shape{};
  T* dz = nullptr;                 // rows x cols
  std::uint8_t* active = nullptr;  // (rows / bm) x (cols / bn): tile computed (not filtered)
  // With one gradient filtered (plan::split_filter): the filter's decision, for that gradient's product; `active`
  // then marks every tile with gradient.
  std::uint8_t* significant = nullptr;
  float* acc = nullptr;            // the pass's fp32 carry: dE (rows x D) over chunks, or dC (cols x D) over row blocks
  float* comp = nullptr;           // Kahan compensation of acc
  // The carried pass's dE carry shares dE's buffer (plan::carry_shares_de): acc holds the second halves.
  bool carry_shares_de = false;
  float* dbias_partial = nullptr;  // row_tiles x cols, the passes that write dBias
  float* db_acc = nullptr;         // cols x r: dB carried over row blocks, the passes that write dB
  int* tile_queue = nullptr;       // 1: the tile counter of the sm_90a persistent products (the passes that pair them)
  // Vocabulary sorting only: the chunk's classifier rows, bias, class weights and B rows, in walk order.
  T* c_sorted = nullptr;            // cols x D
  T* bias_sorted = nullptr;         // cols
  float* weights_sorted = nullptr;  // cols
  T* b_sorted = nullptr;            // cols x r
};

// The near-uniform rows' baseline (row_loss.hpp), plan::baseline only. The products add row_scale[i] class_sum
// to dE row i and row_sums[0..D) to every class of dC, the bias gradient row_sums[D].
// With plan::linear, rows near-uniform to first order add linear_scale[i] e_i (C^T C - s s^T / V) to dE row i
// (s = class_sum) and c (sum_i linear_scale[i] e_i^T e_i) + gram_term to class c of dC.
inline constexpr int baseline_state_count = 5;  // uniform_baseline_buffers::state

struct uniform_baseline_buffers {
  float* row_scale = nullptr;   // N: the baseline on the draw's scale (baseline / T), 0 for other rows
  float* block_max = nullptr;   // row_tiles: the largest tile max of each row tile
  float* class_sum = nullptr;   // D: sum of the classifier rows, once a row is near-uniform (0 until then)
  float* row_sums = nullptr;    // D + 1: sum of row_scale[i] e_i over the rows a product covers, then of row_scale
  float* partial = nullptr;     // max_baseline_splits x (D + 1): class_sum or row_sums per split of their rows
  float* linear_scale = nullptr;  // N: the slope on the product's scale (slope / T), 0 for other rows; plan::linear
  float* class_mean = nullptr;    // D: -class_sum / V; plan::linear
  float* gram_term = nullptr;     // D: -class_sum / V times the rows' Gram matrix; plan::linear
  // With plan::linear a row that takes a baseline leaves its one-hot term to after the walk, as lone targets do
  // (kernel/portable/lone_targets.cuh): -target_scale[i] c_y into dE row i, -target_scale[i] e_i into dC row y (its
  // target tiles are then skipped like the others), through the rows of class y in
  // class_rows[class_offsets[y] .. class_offsets[y + 1]), in row order.
  float* target_scale = nullptr;          // N: ce / T of such a row, 0 for the others
  std::int32_t* target_class = nullptr;   // N: its target
  std::int32_t* class_offsets = nullptr;  // V + 1
  std::int32_t* class_fill = nullptr;     // V: rows placed so far
  std::int32_t* class_rows = nullptr;     // N
  int* state = nullptr;  // 5: [0] a near-uniform row was seen, [1] class_sum holds the column sums, [2] a row may
                         // be near-uniform to first order, [3] with a softcap: the largest squared norm of C's rows
                         // (float bits), taken with the column sums, [4] a row's target is apart without a
                         // baseline (kernel/portable/lone_targets.cuh)
};

// The first-order baseline's products after the walk, in the passes' region (the walk is done with it): the D x D
// matrix (C^T C, then the rows' Gram matrix) and a slab of the rows scaled by linear_scale.
template <class T>
struct linear_baseline_buffers {
  T* gram = nullptr;  // D x D
  T* slab = nullptr;  // N x plan::linear_slab_cols
  int* tile_queue = nullptr;  // 1: the tile counter of the sm_90a persistent products
  // `gram_carries` D x D fp32 sums in the slab's place, as many as fit (null where none does): C^T C summed in parts
  // before the slabs are used.
  float* gram_sums = nullptr;
  std::int64_t gram_carries = 0;
  // The rows' Gram matrix in parts likewise: `row_gram_carries` D x D fp32 sums after the slab, where the slab holds
  // all of D and the region has room left (plan::row_gram_carries).
  float* row_gram_sums = nullptr;
  std::int64_t row_gram_carries = 0;
};

// The width of the tiles whose halves a carry that shares dE's buffer splits (plan::carry_shares_de): the sm_90a
// gradient products' output tile (grad_gemm_shape::bn).
inline constexpr std::int64_t shared_carry_tile = 256;

// The compacted walk (plan::walk_flags): when the live tiles of the whole walk fit the pass's dZ buffer as slots of
// bm x bn, one dlogit launch stores each at its slot and one launch of both products reads them there; the chunk
// walk's launches then return at once (dispatch/portable.cuh). Slots are taken a row tile at a time in column order.
// A row tile's dE runs in parts of at most compact_part_tiles live tiles, so that no CTA takes a row tile whose
// every tile is live alone; the parts of a row tile in several write fp32 sums into the free slots, which a last
// kernel adds in part order.
inline constexpr int compact_state_count = 7;
inline constexpr std::int64_t compact_part_tiles = 32;
inline constexpr std::int64_t compact_part_rows = 128;  // fp32 rows of D in a part's sum: the products' M tile

struct compact_part {
  std::int32_t row_tile, part;
};

struct compact_walk_buffers {
  std::int32_t* slot = nullptr;       // row_tiles x col_tiles: the tile's slot, -1 where it is not computed
  std::int32_t* slot_tile = nullptr;  // row_tiles x col_tiles: the class tile of each slot
  std::int32_t* row_first = nullptr;  // row_tiles: the slot of the row tile's first live tile
  std::int32_t* row_live = nullptr;   // row_tiles: its live tiles
  std::int32_t* row_sums = nullptr;   // row_tiles: the first of its parts' sums, -1 for a row tile in one part
  compact_part* parts = nullptr;      // plan::compact_parts(): the dE parts, row tile by row tile
  int* state = nullptr;  // compact_state_count: [0] live tiles, [1] row tiles ranked, [2] 1: the compacted walk runs,
                         // [3] 1: the chunk walk runs (the live tiles did not fit), [4] the products' tile queue,
                         // [5] dE parts, [6] the fp32 row (of D) of dZ's buffer where the parts' sums start
};

template <class T>
struct backward_buffers {
  row_coefficients* coef = nullptr;  // N
  float* lora_p = nullptr;           // N x r
  float* lora_q = nullptr;           // N x r: draw B
  std::uint8_t* walk_flags = nullptr;  // row_tiles x col_tiles: every tile's flag, in one launch (plan::walk_flags)
  compact_walk_buffers compact;        // plan::walk_flags
  // Set by the call that compacts the walk (compact.state + 3): the chunk walk's kernels run only if it is nonzero.
  const int* chunk_walk_on = nullptr;
  // Vocabulary sorting only.
  float* mean_partial = nullptr;      // mean_splits x (D + 1): column sums of kept rows of E, then their count
  float* key_inputs = nullptr;        // D + 1 + r: the mean row e_bar, the kept count, then scale * A e_bar
  float* sort_keys[2] = {};           // V each: the key, and the sort's second buffer
  std::int32_t* sort_values[2] = {};  // V each: class ids; after the sort one of them is `order`
  void* sort_temp = nullptr;          // plan::sort_temp bytes of the device sort's scratch
  std::int32_t* position = nullptr;   // V: class -> sorted position (the inverse of order)
  // The passes: chunked runs one fused pass (de and dc are the same buffers), minimal the dE pass, then the dC pass,
  // or the carried pass alone (its acc and comp set by the call: in dC's buffer).
  pass_buffers<T> de, dc, carried;
  uniform_baseline_buffers baseline;
  linear_baseline_buffers<T> linear;  // in the passes' region
};

// The buffers of the logit-keeping loss_and_grad (plan::kept_rows rows per block), live together: the forward's
// for one row block, the backward's per-row ones for all N, and one dZ block that first holds the kept logits.
template <class T>
struct kept_buffers {
  forward_buffers<T> fw;   // partials of one block (kept_rows x splits); target_logit, block_sums, lora_p of all N
  backward_buffers<T> bw;  // coef, lora_q of all N (lora_p is fw's); bw.de is the block's pass (dz: kept_rows x V)
  float* logit_ref = nullptr;  // kept_rows x ceil(V / 256): the reference each 256-class tile's stored logits are
                               // relative to
};

struct saved_buffers {
  float* lse = nullptr;                 // N
  float* weight_sum = nullptr;          // 1: sum of w_y over kept rows (the mean's normaliser)
  float* class_weight_total = nullptr;  // 1: W = sum_v w_v, with class weights only (W = V without)
  float* lse_others = nullptr;          // N: log-sum-exp of the non-target classes (lse for rows without a target)
  float* tile_max = nullptr;            // row_tiles x col_tiles: max logit of each tile, for the gradient filter
  // row_tiles x col_tiles: 1 where the filter's split budget skips the forward split holding the tile whole
  // (filter::split_budget; kernel/portable/split_skip.cuh)
  std::uint8_t* split_skip = nullptr;
};

struct plan {
  std::int64_t n = 0, d = 0, v = 0, rank = 0;
  tile::tile_grid grid{};   // N x V in bm x bn tiles
  std::int64_t splits = 1;  // forward vocab splits
  backward_mode mode = backward_mode::chunked;
  // loss_and_grad keeping the logits of row blocks of kept_rows (a multiple of finalise_threads, or all N); 0: not
  // planned (the call runs forward, then backward). A block's forward takes the whole problem's `splits`: the
  // blocks together launch the CTAs one forward would (splitting each block for its own grid made gemma2's 2 %
  // slower, and gave the finaliser four times the partials to merge).
  std::int64_t kept_rows = 0;
  static constexpr int kept_ref_cols = 256;      // classes per stored reference (the sm_90a forward's tile)
  static constexpr std::int64_t kept_min_rows = 512;
  pass_shape de_pass{}, dc_pass{};  // the backward's blocks: the same fused pass in chunked mode
  // Minimal only: the fused pass whose dE carry lives in the dC output (N x chunk; 0 x 0: not planned), and how
  // many of its first chunks have their dC rows under that carry.
  pass_shape carried_pass{};
  std::int64_t chunks_under_carry = 0;
  // The chunks under the half of the carry left in dC where it shares dE's buffer (carry_shares_de); 0: never.
  std::int64_t chunks_under_shared_carry = 0;
  bool filter = false;
  bool split_filter = false;     // the filter applies to dE or to dC only (options::filter_de, filter_dc)
  bool bias = false;
  bool kahan = false;
  bool sort = false;             // options::vocab_sort
  bool baseline = false;         // near-uniform rows take a baseline (options::uniform_tolerance)
  // ... and to first order where they qualify: its per-row buffers (no softcap, no bias), and its products (their
  // buffers fit in the region the passes leave free once done) on slabs of this many columns of E; the rows that
  // take a baseline then leave their one-hot terms to after the walk too.
  bool linear_rows = false;
  std::int64_t linear_slab_cols = 0;
  std::int64_t row_gram_carries = 0;  // fp32 D x D sums of the rows' Gram matrix in parts, after a slab of all D
  bool linear() const { return linear_slab_cols > 0; }
  // The walk's tile flags in one launch for the sm_90a dlogit kernel and the products (dispatch/portable.cuh), not
  // one per chunk and row block: where no pass needs flags of its own, as the sorted walk (decided from the
  // recomputed tiles), one gradient filtered (two sets), the bias (the per-chunk flags zero its skipped column sums)
  // and the low-rank head (its thin products read the pass's flags) do.
  bool walk_flags = false;
  bool weights = false;          // class weights are gathered with the sorted chunks
  std::size_t sort_temp = 0;     // scratch of the device sort, at least 1 byte with vocab_sort
  std::int64_t mean_splits = 1;  // row splits of the column mean of E
  std::size_t elem_bytes = 2;
  int sm_count = 1;              // of the device planned for: persistent grids take one CTA per SM
  static constexpr int finalise_threads = 256;
  static constexpr std::int64_t max_baseline_splits = 64;  // row splits of the baseline's column sums, at most

  std::int64_t finalise_blocks() const { return ceil_div(n, finalise_threads); }
  std::int64_t chunks(const pass_shape& s) const { return ceil_div(v, s.cols); }
  std::int64_t row_blocks(const pass_shape& s) const { return ceil_div(n, s.rows); }
  // Slots of the compacted walk (compact_walk_buffers): bm x bn tiles in the largest dZ buffer of the planned passes,
  // each of which starts the passes' region (a pass of all N rows and V classes holds every tile where bm divides N).
  std::int64_t compact_capacity() const {
    std::int64_t elements = 0;
    for (const pass_shape& s : {de_pass, dc_pass, carried_pass})
      elements = std::max(elements, std::min(s.rows, n) * s.cols);
    return walk_flags ? elements / (grid.bm * grid.bn) : 0;
  }
  // The compacted walk's slots as fp32 rows of D, where the dE parts' sums go: slots of elem_bytes elements.
  std::int64_t compact_sum_rows(std::int64_t elem_bytes) const {
    return compact_capacity() * grid.bm * grid.bn * elem_bytes / (std::int64_t(sizeof(float)) * d);
  }
  // The most dE parts the compacted walk can have: a part per row tile, and one per compact_part_tiles live tiles
  // (counted against every tile: the per-row buffers are carved before the passes' shapes are chosen).
  std::int64_t compact_parts() const { return walk_flags ? grid.row_tiles() + grid.tiles() / compact_part_tiles : 0; }
  // Floats of dE's carry (and its compensation) in the dC output.
  std::int64_t carry_floats() const { return n * d * (kahan ? 2 : 1); }
  // The carried pass's buffers with dE's carry, then its compensation, at the start of dC's buffer; where the carry
  // shares dE's buffer, its second halves there.
  template <class T>
  pass_buffers<T> carried_in(const pass_buffers<T>& carried, void* dc, bool shares_de = false) const {
    pass_buffers<T> b = carried;
    b.acc = static_cast<float*>(dc);
    b.comp = kahan ? b.acc + n * d : nullptr;
    b.carry_shares_de = shares_de;
    return b;
  }
  // Whether the carried pass's carry shares dE's buffer: the first 128 columns of each shared_carry_tile columns
  // of the carry in the bytes of dE that the tile's 16-bit output takes (an N x D/2 fp32 array), the last 128 in
  // dC's buffer (the same shape), so that half as many classes of dC lie under the carry and are recomputed. Only
  // where the sm_90a products write dE (`hopper`: their TMA epilogue reads a tile's carry whole before it stores
  // the tile's output over it, and no other tile's output overlaps it) in 16-bit gradients with row pitch D, and no
  // low-rank term (which that epilogue does not add).
  bool carry_shares_de(bool hopper, std::size_t grad_bytes, const void* de, std::int64_t ld_de) const {
    return chunks_under_shared_carry > 0 && hopper && grad_bytes == 2 && ld_de == d && rank == 0 && aligned_to(de, 16);
  }
  // Whether a backward runs the carried pass: planned, and the call writes dE and a contiguous dC (row pitch
  // `ld_dc`) whose buffer can hold fp32 values.
  bool carries_in_dc(bool de, const void* dc, std::int64_t ld_dc) const {
    return mode == backward_mode::minimal && carried_pass.cols > 0 && de && dc != nullptr && ld_dc == d &&
           aligned_to(dc, 16);
  }

  saved_buffers carve_saved(void* base, std::size_t* bytes = nullptr) const {
    carver c(base);
    saved_buffers s;
    s.lse = c.take<float>(n);
    s.weight_sum = c.take<float>(1);
    s.class_weight_total = c.take<float>(1);
    s.lse_others = c.take<float>(n);
    s.tile_max = c.take<float>(filter ? grid.tiles() : 0);
    s.split_skip = c.take<std::uint8_t>(filter ? grid.tiles() : 0);
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
    backward_buffers<T> b = carve_backward_rows<T>(c);
    // The passes run one after the other: each carves the same region from its start.
    char* region = base ? static_cast<char*>(base) + c.bytes() : nullptr;
    const bool fused = mode == backward_mode::chunked;
    std::size_t de_bytes = 0, dc_bytes = 0, carried_bytes = 0;
    b.de = carve_pass<T>(region, de_pass, true, fused, &de_bytes);
    b.dc = fused ? b.de : carve_pass<T>(region, dc_pass, false, true, &dc_bytes);
    if (carried_pass.cols > 0) b.carried = carve_pass<T>(region, carried_pass, true, true, &carried_bytes, false);
    b.linear = carve_linear<T>(region);
    if (bytes) *bytes = c.bytes() + std::max({de_bytes, dc_bytes, carried_bytes});
    return b;
  }
  // Bytes of the region the passes share.
  template <class T>
  std::size_t pass_region_bytes() const {
    carver c;
    carve_backward_rows<T>(c);
    std::size_t total = 0;
    carve_backward<T>(nullptr, &total);
    return total - c.bytes();
  }

  // How many D x D fp32 sums of C^T C in parts fit in the place of a slab of `slab_cols` columns.
  template <class T>
  std::int64_t gram_sums_fit(std::int64_t slab_cols) const {
    return d > 0 ? std::int64_t(std::size_t(n * slab_cols) * sizeof(T) / (std::size_t(d * d) * sizeof(float))) : 0;
  }

  template <class T>
  linear_baseline_buffers<T> carve_linear(void* region, std::size_t* bytes = nullptr) const {
    return carve_linear<T>(region, linear_slab_cols, row_gram_carries, bytes);
  }
  template <class T>
  linear_baseline_buffers<T> carve_linear(void* region, std::int64_t slab_cols, std::int64_t row_carries,
                                          std::size_t* bytes = nullptr) const {
    carver c(region);
    linear_baseline_buffers<T> b;
    b.gram = c.take<T>(slab_cols > 0 ? d * d : 0);
    b.slab = c.take<T>(n * slab_cols);
    b.gram_carries = gram_sums_fit<T>(slab_cols);
    if (b.gram_carries > 0) b.gram_sums = reinterpret_cast<float*>(b.slab);
    b.tile_queue = c.take<int>(slab_cols > 0 ? 1 : 0);
    b.row_gram_carries = row_carries;
    b.row_gram_sums = c.take<float>(row_carries * d * d);
    if (bytes) *bytes = c.bytes();
    return b;
  }

  // The backward's buffers outside the passes' region: per row, and the vocabulary sort's.
  template <class T>
  backward_buffers<T> carve_backward_rows(carver& c) const {
    backward_buffers<T> b;
    b.coef = c.take<row_coefficients>(n);
    b.lora_p = c.take<float>(n * rank);
    b.lora_q = c.take<float>(n * rank);
    b.walk_flags = c.take<std::uint8_t>(walk_flags ? grid.tiles() : 0);
    b.compact.slot = c.take<std::int32_t>(walk_flags ? grid.tiles() : 0);
    b.compact.slot_tile = c.take<std::int32_t>(walk_flags ? grid.tiles() : 0);
    b.compact.row_first = c.take<std::int32_t>(walk_flags ? grid.row_tiles() : 0);
    b.compact.row_live = c.take<std::int32_t>(walk_flags ? grid.row_tiles() : 0);
    b.compact.row_sums = c.take<std::int32_t>(walk_flags ? grid.row_tiles() : 0);
    b.compact.parts = c.take<compact_part>(compact_parts());
    b.compact.state = c.take<int>(walk_flags ? compact_state_count : 0);
    b.baseline = carve_baseline(c);
    if (sort) {
      b.mean_partial = c.take<float>(mean_splits * (d + 1));
      b.key_inputs = c.take<float>(d + 1 + rank);
      for (int i = 0; i < 2; ++i) b.sort_keys[i] = c.take<float>(v);
      for (int i = 0; i < 2; ++i) b.sort_values[i] = c.take<std::int32_t>(v);
      b.sort_temp = c.take<unsigned char>(sort_temp);
      b.position = c.take<std::int32_t>(v);
    }
    return b;
  }

  uniform_baseline_buffers carve_baseline(carver& c) const {
    uniform_baseline_buffers b;
    if (!baseline) return b;
    b.row_scale = c.take<float>(n);
    b.block_max = c.take<float>(grid.row_tiles());
    b.class_sum = c.take<float>(d);
    b.row_sums = c.take<float>(d + 1);
    b.partial = c.take<float>(max_baseline_splits * (d + 1));
    b.linear_scale = c.take<float>(linear_rows ? n : 0);
    b.class_mean = c.take<float>(linear_rows ? d : 0);
    b.gram_term = c.take<float>(linear_rows ? d : 0);
    b.target_scale = c.take<float>(linear_rows ? n : 0);
    b.target_class = c.take<std::int32_t>(linear_rows ? n : 0);
    b.class_offsets = c.take<std::int32_t>(linear_rows ? v + 1 : 0);
    b.class_fill = c.take<std::int32_t>(linear_rows ? v : 0);
    b.class_rows = c.take<std::int32_t>(linear_rows ? n : 0);
    b.state = c.take<int>(baseline_state_count);
    return b;
  }

  // One pass's buffers: with `de`, the dE carry across chunks (unless `own_carry` is false); with `dc`, what dC,
  // dBias and dB need.
  template <class T>
  pass_buffers<T> carve_pass(void* base, const pass_shape& s, bool de, bool dc, std::size_t* bytes,
                             bool own_carry = true) const {
    carver c(base);
    pass_buffers<T> b;
    b.shape = s;
    const std::int64_t rows = std::min(s.rows, n);
    b.dz = c.take<T>(rows * s.cols);
    b.active = c.take<std::uint8_t>(ceil_div(rows, grid.bm) * (s.cols / grid.bn));
    b.significant = c.take<std::uint8_t>(split_filter ? ceil_div(rows, grid.bm) * (s.cols / grid.bn) : 0);
    // dE is carried across chunks unless one chunk holds every class, dC across row blocks unless one holds all N.
    const std::int64_t carry =
        own_carry ? (de && chunks(s) > 1 ? rows * d : 0) + (!de && dc && row_blocks(s) > 1 ? s.cols * d : 0) : 0;
    b.acc = c.take<float>(carry);
    b.comp = c.take<float>(kahan ? carry : 0);
    if (dc) {
      b.db_acc = c.take<float>(s.cols * rank);
      b.dbias_partial = c.take<float>(bias ? grid.row_tiles() * s.cols : 0);
    }
    b.tile_queue = c.take<int>(de && dc && rows > 0 ? 1 : 0);
    if (sort) {
      b.c_sorted = c.take<T>(s.cols * d);
      b.bias_sorted = c.take<T>(bias ? s.cols : 0);
      b.weights_sorted = c.take<float>(weights ? s.cols : 0);
      b.b_sorted = c.take<T>(s.cols * rank);
    }
    *bytes = c.bytes();
    return b;
  }

  template <class T>
  kept_buffers<T> carve_kept(void* base, std::size_t* bytes = nullptr) const {
    carver c(base);
    kept_buffers<T> k;
    const std::int64_t rows = std::min(kept_rows, n), cols = round_up(v, std::int64_t(grid.bn));
    k.fw.partials = c.take<row_partial>(rows * splits);
    k.fw.target_logit = c.take<float>(n);
    k.fw.block_sums = c.take<float>(2 * finalise_blocks());
    k.fw.lora_p = c.take<float>(n * rank);
    k.bw.coef = c.take<row_coefficients>(n);
    k.bw.lora_p = k.fw.lora_p;
    k.bw.lora_q = c.take<float>(n * rank);
    k.bw.baseline = carve_baseline(c);
    k.logit_ref = c.take<float>(rows * ceil_div(v, std::int64_t(kept_ref_cols)));
    pass_buffers<T>& pb = k.bw.de;
    pb.shape = {rows, cols};
    pb.dz = c.take<T>(rows * cols);
    pb.active = c.take<std::uint8_t>(ceil_div(rows, grid.bm) * (cols / grid.bn));
    pb.significant = c.take<std::uint8_t>(split_filter ? ceil_div(rows, grid.bm) * (cols / grid.bn) : 0);
    pb.db_acc = c.take<float>(cols * rank);
    pb.dbias_partial = c.take<float>(bias ? ceil_div(rows, grid.bm) * cols : 0);
    pb.tile_queue = c.take<int>(1);
    k.bw.linear = carve_linear<T>(pb.dz);
    if (bytes) *bytes = c.bytes();
    return k;
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
    if (kept_rows > 0) {
      std::size_t k = 0;
      carve_kept<T>(nullptr, &k);
      b = std::max(b, k);
    }
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

// Estimated time of one minimal-mode pass, in FLOP-equivalents, for dZ blocks of `rows` x `cols`; `de`: the pass
// whose product is dE (its output tiles lie along the rows, its carry is dE), else dC. Each launch (dlogits, then
// the product) costs its whole waves of 128 x 256 tiles (the sm_90a tile; the portable ones are smaller, so what
// fills the GPU with these fills it with those); each fp32 carry round trip costs its bytes; each launch a fixed
// ramp-up and tail. The constants are of an H100-class GPU (dense bf16 against HBM bandwidth, launch gaps).
inline double pass_cost(std::int64_t n, std::int64_t d, std::int64_t v, const pass_shape& s, bool de, int sms) {
  constexpr std::int64_t tile_m = 128, tile_n = 256;
  constexpr double flops_per_byte = 300, flops_per_launch = 4e9;
  const double wave_flops = 2.0 * tile_m * tile_n * sms;  // per unit of depth
  auto waves = [&](std::int64_t tiles) { return double(ceil_div(tiles, std::int64_t(sms))); };
  // The blocks along an axis: `len / blk` whole ones and the remainder.
  auto blocks = [](std::int64_t len, std::int64_t blk, auto&& f) {
    if (len / blk > 0) f(blk, len / blk);
    if (len % blk > 0) f(len % blk, std::int64_t(1));
  };
  double cost = 0;
  blocks(n, s.rows, [&](std::int64_t rows, std::int64_t row_count) {
    blocks(v, s.cols, [&](std::int64_t cols, std::int64_t col_count) {
      const double launches = double(row_count * col_count);
      const double dlogit = waves(ceil_div(rows, tile_m) * ceil_div(cols, tile_n)) * wave_flops * double(d);
      const double product = de ? waves(ceil_div(rows, tile_m) * ceil_div(d, tile_n)) * wave_flops * double(cols)
                                : waves(ceil_div(cols, tile_m) * ceil_div(d, tile_n)) * wave_flops * double(rows);
      cost += launches * (dlogit + product + 2 * flops_per_launch);
    });
  });
  const std::int64_t carried = de ? ceil_div(v, s.cols) - 1 : ceil_div(n, s.rows) - 1;  // round trips per element
  cost += flops_per_byte * 8.0 * double(carried) * double(de ? n : v) * double(d);
  return cost;
}

// Tiles of the busiest of `walkers` persistent walkers when walker w takes units w, w + walkers, ... of the
// m_tiles x splits units in tile::grouped_order (groups of `group` row tiles), a unit of split n holding
// tile::split_begin's share of `tiles` tiles: what the launch lasts, in tiles. Each walker takes units / walkers units
// (one more for the first units % walkers) of `tiles / splits` tiles, plus the longer units it meets: a split n below
// tiles % splits is one tile longer, and those units lie in one run per group, of which a walker takes run / walkers
// plus one where it falls in the run's cyclic window of run % walkers positions. The windows add up in a difference
// array over the walkers, `step`: the caller's scratch of at least walkers + 1 entries.
inline std::int64_t busiest_walker_tiles(std::int64_t m_tiles, std::int64_t splits, std::int64_t group,
                                         std::int64_t tiles, std::int64_t walkers, std::int64_t* step) {
  const std::int64_t units = m_tiles * splits, p = std::min(walkers, units);
  if (p <= 0) return 0;
  group = std::clamp<std::int64_t>(group, 1, m_tiles);
  const std::int64_t base = tiles / splits, longer = tiles % splits;
  std::fill(step, step + p + 1, std::int64_t(0));
  const auto window = [&](std::int64_t from, std::int64_t len, std::int64_t weight) {  // len < p positions from `from`
    if (len <= 0) return;
    step[std::size_t(from)] += weight;
    if (from + len <= p) {
      step[std::size_t(from + len)] -= weight;
    } else {
      step[std::size_t(p)] -= weight;
      step[0] += weight;
      step[std::size_t(from + len - p)] -= weight;
    }
  };
  std::int64_t every = base * (units / p);
  window(0, units % p, base);
  for (std::int64_t first_m = 0; first_m < m_tiles; first_m += group) {
    const std::int64_t run = longer * std::min(group, m_tiles - first_m);
    every += run / p;
    window(first_m * splits % p, run % p, 1);
  }
  std::int64_t most = 0, at = 0;
  for (std::int64_t w = 0; w < p; ++w) most = std::max(most, at += step[std::size_t(w)]);
  return every + most;
}

// The forward's vocab splits for the sm_90a kernel (sm90::forward_unit_shape), from `splits` as the CTA count asks:
// with short units it walks them round-robin on persistent CTAs, or on clusters of two where the row tiles pair up
// (sm90::shares_classifier), so the split count within a factor of two that leaves the busiest walker the fewest tiles (phi3.5
// on an H100: 35 instead of 33, 62 tiles against 64; its forward 0.8-3.8 % faster, docs/performance.md). Long units
// (512 k-blocks, sm90::long_class_runs) take a CTA or cluster each, which the GPU hands out as SMs free up: unchanged.
// The scan's scratch lives on the stack (the plan is made on every call): devices with more walkers keep `splits`.
inline constexpr std::int64_t max_forward_walkers = 512;
template <class T>
std::int64_t sm90_forward_splits(std::int64_t splits, std::int64_t row_tiles, std::int64_t d, std::int64_t v,
                                 const device_info& dev, const options& opt) {
  if (dev.arch != 90 || !opt.hopper_kernels || sizeof(T) != 2 || row_tiles <= 0 || v <= 0) return splits;
  using S = sm90::forward_unit_shape;
  const auto short_units = [&](std::int64_t s) { return !sm90::long_class_runs(v, d, s); };
  if (!short_units(splits)) return splits;
  const std::int64_t wide = ceil_div(v, S::classes);
  const std::int64_t cluster = sm90::shares_classifier(row_tiles, v, d, splits) ? sm90::forward_cluster : 1;
  const std::int64_t walkers = std::max(dev.sm_count, 1) / cluster;
  if (walkers > max_forward_walkers) return splits;
  const std::int64_t group = tile::l2_row_group(S::rows * d * std::int64_t(sizeof(T))) / cluster;
  const std::int64_t m_tiles = ceil_div(row_tiles, cluster);
  std::array<std::int64_t, max_forward_walkers + 1> step;
  const auto busiest = [&](std::int64_t s) {
    return busiest_walker_tiles(m_tiles, s, group, wide, walkers, step.data());
  };
  // Ascending, the first count that improves on `splits` most; the scan stops at the bound every count shares (the
  // tiles spread evenly), as the plan is made on every call.
  const std::int64_t even = ceil_div(m_tiles * wide, std::min(walkers, m_tiles * wide));
  std::int64_t best = splits, fewest = busiest(splits);
  for (std::int64_t s = std::max<std::int64_t>(splits / 2, 1); s <= std::min(wide, 2 * splits) && fewest > even; ++s) {
    if (!short_units(s)) continue;
    const std::int64_t t = busiest(s);
    if (t < fewest) best = s, fewest = t;
  }
  return best;
}

// The default budgets of the operating points (docs/api.md).
inline constexpr std::size_t minimal_budget = std::size_t(64) << 20, chunked_budget = std::size_t(256) << 20,
                             loss_and_grad_budget = std::size_t(1) << 30;

// The chunked or minimal plan of make_plan (below), before loss_and_grad's logit blocks.
template <class T>
plan plan_operating_point(std::int64_t n, std::int64_t d, std::int64_t v, std::int64_t rank, bool bias,
                          const options& opt, int bm, int bn, const device_info& dev, std::size_t budget, bool weights,
                          std::size_t sort_temp, int forward_ctas_per_sm) {
  plan p;
  p.n = n;
  p.d = d;
  p.v = v;
  p.rank = rank;
  p.grid = tile::tile_grid{n, v, bm, bn};
  p.filter = opt.filter != filter_mode::none && (opt.filter_de || opt.filter_dc);
  p.split_filter = p.filter && opt.filter_de != opt.filter_dc;
  p.bias = bias;
  p.kahan = opt.accum == accumulation::kahan;
  // With one gradient filtered the walk computes every tile with gradient; the filtered product's flags come from
  // the forward's maxima, which describe the original order: the walk stays unsorted.
  p.sort = opt.vocab_sort && !p.split_filter;
  // The baseline's share is added for every class through C's column sums: not with the low-rank head (its
  // classifier is C + s B A), smoothing (no filter) or the sorted walk (whose tiles are decided from the recomputed
  // logits); nor with one class tile, which holds every target; nor with one gradient filtered, whose walk computes
  // every tile anyway.
  p.baseline = p.filter && !p.split_filter && opt.label_smoothing == 0.f && rank == 0 && !p.sort &&
               p.grid.col_tiles() > 1;
  p.linear_rows = p.baseline && !bias;  // plan_linear_baseline
  p.walk_flags =
      dev.arch == 90 && opt.hopper_kernels && sizeof(T) == 2 && !p.sort && !p.split_filter && !bias && rank == 0;
  p.weights = weights;
  p.sort_temp = p.sort ? std::max<std::size_t>(sort_temp, 1) : 0;  // a null scratch means a size query
  p.mean_splits = std::clamp<std::int64_t>(ceil_div(n, mean_rows_per_split), 1, 64);
  p.elem_bytes = sizeof(T);
  p.sm_count = std::max(dev.sm_count, 1);

  // Forward: split the vocabulary until the grid holds about `forward_ctas_per_sm` CTAs per SM, so that the last
  // partial wave costs little (with two resident CTAs per SM and 1.2 waves, half the second wave's time is idle).
  const std::int64_t target_ctas = std::int64_t(std::max(forward_ctas_per_sm, 1)) * std::max(dev.sm_count, 1);
  // (N = 0 has no row tile: one split, and no division by zero.)
  p.splits = std::clamp<std::int64_t>(ceil_div(target_ctas, std::max<std::int64_t>(p.grid.row_tiles(), 1)), 1,
                                      p.grid.col_tiles());
  p.splits = sm90_forward_splits<T>(p.splits, p.grid.row_tiles(), d, v, dev, opt);

  backward_mode mode = opt.backward_mode;
  if (mode == backward_mode::loss_and_grad) mode = backward_mode::chunked;
  if (budget == 0) budget = mode == backward_mode::minimal ? minimal_budget : chunked_budget;

  // Chunked first (fewer GEMM-equivalents): the fewest equal vocab chunks whose buffers fit the budget (each chunk
  // adds dE's fp32 carry once more and ends two launches). Unless the chunk is so narrow (many rows against the
  // budget) that dC_chunk = dZ^T E has fewer tiles than the GPU has SMs: that GEMM would run its N-deep reduction on
  // part of the GPU, once per chunk, and the row blocks of `minimal` do the same work with every SM busy (measured on
  // H100, gpt2 shape at N = 65,536: 450 ms chunked, 120 ms minimal).
  const std::int64_t max_chunk = round_up(v, bn);
  auto fits = [&](plan candidate) { return candidate.workspace_bytes<T>() <= budget; };
  auto fills_gpu = [&](std::int64_t cols) {
    return cols >= max_chunk || ceil_div(cols, bm) * ceil_div(d, bn) >= std::max(dev.sm_count, 1);
  };
  if (v > 0 && (mode != backward_mode::minimal || n <= bm)) {
    p.mode = backward_mode::chunked;
    auto in_chunks = [&](std::int64_t count) {
      plan c = p;
      c.de_pass = c.dc_pass = pass_shape{std::max<std::int64_t>(n, 1), round_up(ceil_div(v, count), std::int64_t(bn))};
      return c;
    };
    std::int64_t lo = 0, hi = ceil_div(v, std::int64_t(bn));  // hi: one tile a chunk; if that does not fit, none does
    if (fits(in_chunks(hi))) {
      while (hi - lo > 1) {
        const std::int64_t mid = (lo + hi) / 2;
        (fits(in_chunks(mid)) ? hi : lo) = mid;
      }
      const plan chunked = in_chunks(hi);
      if (fills_gpu(chunked.de_pass.cols) || n <= bm) return chunked;
    }
  }
  // Minimal: each pass takes, of the block shapes that fit, the one of least estimated time. The passes share
  // their region, so each may fill it (what is left of the budget after the per-row buffers). For each
  // length of the axis the product keeps (rows for dE, classes for dC), the other axis gets the longest block that
  // fits: all of it if possible, which needs no carry.
  // A pass for which no shape fits keeps the smallest blocks (bm x bn), and the size query reports what they need.
  // They are not always the smallest footprint: their carries grow with D (bm x D, bn x D), where a block of all N
  // rows or all V classes needs none, so every shape is weighed whatever the budget.
  p.mode = backward_mode::minimal;
  p.de_pass = p.dc_pass = pass_shape{bm, bn};
  if (n == 0 || v == 0) return p;
  carver rows_part;
  p.carve_backward_rows<T>(rows_part);
  if (rows_part.bytes() > budget) return p;
  const std::size_t pass_budget = budget - rows_part.bytes();
  auto pass_fits = [&](const pass_shape& s, bool de) {
    std::size_t bytes = 0;
    p.carve_pass<T>(nullptr, s, de, !de, &bytes);
    return bytes <= pass_budget;
  };
  auto choose = [&](bool de) {
    const std::int64_t keep_unit = de ? bm : bn, keep_all = de ? n : max_chunk;
    const std::int64_t other_unit = de ? bn : bm, other_all = de ? max_chunk : n;
    auto shape = [&](std::int64_t keep, std::int64_t other) {
      return de ? pass_shape{keep, other} : pass_shape{other, keep};
    };
    pass_shape best{bm, bn};
    double best_cost = -1;
    auto consider = [&](std::int64_t keep) {
      pass_shape s = shape(keep, other_all);
      if (!pass_fits(s, de)) {  // the longest multiple of the unit that fits, by bisection
        std::int64_t lo = 0, hi = ceil_div(other_all, other_unit);
        while (hi - lo > 1) {
          const std::int64_t mid = (lo + hi) / 2;
          (pass_fits(shape(keep, mid * other_unit), de) ? lo : hi) = mid;
        }
        if (lo == 0) return;
        s = shape(keep, lo * other_unit);
      }
      const double cost = pass_cost(n, d, v, s, de, p.sm_count);
      if (best_cost < 0 || cost < best_cost) {
        best = s;
        best_cost = cost;
      }
    };
    constexpr std::int64_t max_candidates = 64;
    for (std::int64_t keep = keep_unit; keep < keep_all && keep <= max_candidates * keep_unit; keep += keep_unit) {
      consider(keep);
    }
    consider(keep_all);
    return best;
  };
  p.de_pass = choose(true);
  p.dc_pass = choose(false);
  // One row block: the fused chunked pass does the same work with one GEMM-equivalent less, if its chunk still
  // gives dC_chunk a tile per SM.
  if (p.de_pass.rows >= n) {
    plan fused = p;
    fused.mode = backward_mode::chunked;
    for (std::int64_t cols = p.de_pass.cols; cols >= bn; cols = cols > 2 * bn ? round_up(cols / 2, bn) : cols - bn) {
      fused.de_pass = fused.dc_pass = pass_shape{n, cols};
      if (!fits(fused)) continue;
      if (fills_gpu(cols)) return fused;
      break;
    }
  }
  // The carried pass, for calls that overwrite dC: the fewest equal chunks whose buffers, less the carry, fit the
  // passes' region, if that chunk gives dC_chunk a tile per SM and leaves at most 3/4 of the chunks under the carry
  // (each of those but the last recomputes its dZ: the pass costs at most 4.75 GEMM-equivalents against the two
  // passes' 5). The chunks under it are counted for a dC of T, the narrowest the call may pass.
  if (!opt.accumulate && !p.sort) {
    auto chunk_cols = [&](std::int64_t count) { return round_up(ceil_div(v, count), std::int64_t(bn)); };
    auto carried_fits = [&](std::int64_t count) {
      std::size_t bytes = 0;
      p.carve_pass<T>(nullptr, pass_shape{n, chunk_cols(count)}, true, true, &bytes, false);
      return bytes <= pass_budget;
    };
    std::int64_t lo = 1, hi = ceil_div(v, std::int64_t(bn));  // one chunk would lie under the carry: more than 1
    if (carried_fits(hi)) {
      while (hi - lo > 1) {
        const std::int64_t mid = (lo + hi) / 2;
        (carried_fits(mid) ? hi : lo) = mid;
      }
      const pass_shape s{n, chunk_cols(hi)};
      const std::int64_t under_classes =
          ceil_div(p.carry_floats() * std::int64_t(sizeof(float)), d * std::int64_t(sizeof(T)));
      const std::int64_t under = ceil_div(under_classes, s.cols);
      if (fills_gpu(s.cols) && 4 * under <= 3 * p.chunks(s)) {
        p.carried_pass = s;
        p.chunks_under_carry = under;
        // Half the carry, without compensation, for 16-bit inputs (the sm_90a products) and whole tiles of D.
        if (!p.kahan && sizeof(T) == 2 && d % shared_carry_tile == 0)
          p.chunks_under_shared_carry =
              ceil_div(ceil_div(n * d * std::int64_t(sizeof(float)) / 2, d * std::int64_t(sizeof(T))), s.cols);
      }
    }
  }
  return p;
}

// loss_and_grad keeping logit blocks (plan::kept_rows): all N rows in one block if its buffers fit the budget, else
// the fewest blocks that fit, of equal multiples of the finaliser's blocks (whose loss sums then land in their own
// slots). Only where the sm_90a forward can write the logits (16-bit inputs on compute capability 9.0; the call
// checks the rest), without vocabulary sorting (its walk recomputes tiles in sorted order), and with blocks of at
// least kept_min_rows: shorter ones would run each product on a fraction of the GPU. With Kahan sums there is one
// block or none, since dC is added to the output once per block.
template <class T>
void plan_kept_logits(plan& p, const options& opt, const device_info& dev, std::size_t budget) {
  if (opt.backward_mode != backward_mode::loss_and_grad || !opt.hopper_kernels || dev.arch != 90 ||
      sizeof(T) != 2 || p.sort || p.n == 0 || p.v == 0) {
    return;
  }
  auto with_rows = [&](std::int64_t rows) {
    plan k = p;
    k.kept_rows = rows;
    return k;
  };
  auto fits = [&](std::int64_t rows) {
    std::size_t bytes = 0;
    with_rows(rows).template carve_kept<T>(nullptr, &bytes);
    return bytes <= budget;
  };
  std::int64_t rows = p.n;
  if (!fits(rows)) {
    constexpr std::int64_t unit = plan::finalise_threads;
    std::int64_t lo = 0, hi = ceil_div(p.n, unit);  // fits(lo * unit) or lo = 0; !fits(hi * unit)
    while (hi - lo > 1) {
      const std::int64_t mid = (lo + hi) / 2;
      (fits(mid * unit) ? lo : hi) = mid;
    }
    if (lo == 0 || p.kahan) return;
    // As many blocks, evened out. Planning again from the size this gives finds the same count, so the same rows.
    rows = round_up(ceil_div(p.n, ceil_div(p.n, lo * unit)), unit);
    if (rows < plan::kept_min_rows) return;
  }
  p = with_rows(rows);
}

// The first-order baseline's products (plan::linear_slab_cols), where its per-row buffers are planned (with the
// baseline and no bias): when the D x D matrix and a slab
// of at least one tile of columns fit in the region the passes (or loss_and_grad's dZ block) leave once done; the
// widest such slab, up to all of D. They add nothing to the workspace.
template <class T>
void plan_linear_baseline(plan& p) {
  if (!p.linear_rows) return;
  std::size_t region = p.pass_region_bytes<T>();
  if (p.kept_rows > 0) {
    region =
        std::min(region, std::size_t(std::min(p.kept_rows, p.n) * round_up(p.v, std::int64_t(p.grid.bn))) * sizeof(T));
  }
  const std::int64_t unit = p.grid.bn, widest = round_up(p.d, unit);
  auto fits = [&](std::int64_t cols, std::int64_t row_carries = 0) {
    std::size_t bytes = 0;
    p.carve_linear<T>(nullptr, cols, row_carries, &bytes);
    return bytes <= region;
  };
  if (!fits(unit)) return;
  std::int64_t lo = 1, hi = widest / unit + 1;  // fits(lo * unit), !fits(hi * unit) or hi past widest
  while (hi - lo > 1) {
    const std::int64_t mid = (lo + hi) / 2;
    (fits(mid * unit) ? lo : hi) = mid;
  }
  p.linear_slab_cols = lo * unit;
  // Room for the rows' Gram matrix in parts (at small D the product of depth N has few tiles): as many carries as
  // C^T C may take (those that fit in the slab's place: their zeros, sums and reads then cost less than the slab the
  // product streams), up to the 8 of sm90::symmetric_k_splits' 16 parts, where the region has room after the slab.
  if (p.linear_slab_cols >= p.d) {
    const std::int64_t most = std::min<std::int64_t>(8, p.gram_sums_fit<T>(p.linear_slab_cols));
    while (p.row_gram_carries < most && fits(p.linear_slab_cols, p.row_gram_carries + 1)) ++p.row_gram_carries;
  }
}

// Plan for a problem: `bm` x `bn` logit tiles, a workspace budget in bytes (0: the default of the mode).
// `weights`: the problem has class weights; `sort_temp`: bytes of the device sort's scratch for V keys (what the
// GPU path's sort asks for; 0 on the host), used with options::vocab_sort; `forward_ctas_per_sm`: the forward
// grid's target (tile::policy::forward_ctas_per_sm).
template <class T>
plan make_plan(std::int64_t n, std::int64_t d, std::int64_t v, std::int64_t rank, bool bias, const options& opt, int bm,
               int bn, const device_info& dev, std::size_t budget, bool weights = false, std::size_t sort_temp = 0,
               int forward_ctas_per_sm = 16) {
  if (budget == 0 && opt.backward_mode == backward_mode::loss_and_grad) budget = loss_and_grad_budget;
  plan p = plan_operating_point<T>(n, d, v, rank, bias, opt, bm, bn, dev, budget, weights, sort_temp,
                                   forward_ctas_per_sm);
  plan_kept_logits<T>(p, opt, dev, budget);
  plan_linear_baseline<T>(p);
  return p;
}

}  // namespace detail
}  // namespace cce
