// Launch sequence of the portable (sm_80+) path for a plan: which kernels run, in which order, on which buffers.
// Everything is enqueued on the caller's stream; nothing is allocated and the host never waits.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <cce/detail/targets.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/dispatch/sm90.cuh>
#include <cce/dispatch/smem_limit.hpp>
#include <cce/epilogue/logit_terms.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/kernel/portable/dlogit.cuh>
#include <cce/kernel/portable/forward.cuh>
#include <cce/kernel/portable/grad_gemm.cuh>
#include <cce/kernel/portable/lone_targets.cuh>
#include <cce/kernel/portable/row_kernels.cuh>
#include <cce/kernel/portable/split_skip.cuh>
#include <cce/kernel/portable/uniform_baseline.cuh>
#include <cce/kernel/portable/vocab_sort.cuh>
#include <cce/kernel/sm90/kept_dlogit.cuh>
#include <cce/problem.hpp>
#include <cce/status.hpp>

namespace cce::detail {

inline status launch_status() { return cudaGetLastError() == cudaSuccess ? status::success : status::cuda_error; }

#define CCE_TRY(expr)                                           \
  do {                                                          \
    if (const ::cce::status cce_s_ = (expr); cce_s_ != ::cce::status::success) return cce_s_; \
  } while (0)

// Launches Kernel with `smem` bytes of dynamic shared memory; `most` is the largest it ever takes (smem_limit.hpp).
template <auto Kernel, class Params>
status launch_tile_kernel(dim3 grid, int threads, std::size_t smem, cudaStream_t stream, const Params& prm,
                          std::size_t most = 0) {
  if (grid.x == 0 || grid.y == 0) return status::success;
  if (!allow_dynamic_smem<Kernel>(smem, most)) return status::unsupported_arch;  // no image, or too little memory
  Kernel<<<grid, threads, smem, stream>>>(prm);
  return launch_status();
}

inline unsigned blocks_for(std::int64_t work, int threads) { return unsigned((work + threads - 1) / threads); }

template <class T, class Policy>
class portable_path {
  static_assert(Policy::bm == Policy::bn, "filter flags are shared by the dE (rows) and dC (classes) products");
  using fwd_loop = mainloop_for<T, Policy, major::k, major::k>;
  static constexpr std::size_t dz_smem =
      std::max(fwd_loop::smem_bytes, std::size_t(Policy::bn) * fwd_loop::fragment_layout::col_groups * sizeof(float));

 public:
  // hopper: the logit-tile steps (forward, dlogits) run on the sm_90a kernels (sm90.cuh decides when they may).
  portable_path(const problem<T>& p, const options& o, const plan& pl, bool vectorized, bool hopper = false)
      : p_(p), o_(o), pl_(pl), vec_(vectorized), hopper_(hopper) {}

  status forward(const forward_outputs& out, const saved_buffers& sv, const forward_buffers<T>& fw,
                 cudaStream_t stream) const {
    const bool argmax = out.correct != nullptr;
    if (p_.n > 0) CCE_TRY(forward_tiles(sv, fw, argmax, stream));
    split_rows rows;
    rows.partials = fw.partials;
    rows.splits = pl_.splits;
    rows.target_logit = fw.target_logit;
    CCE_TRY(finalise(rows, out, sv, fw, stream));
    return split_skips(sv, fw.partials, fw.target_logit, 0, p_.n, forward_split_cols(argmax), stream);
  }

  // This vocabulary shard's statistics (epilogue/shard_stats.hpp) into `stats`; the filter's tile maxima into sv.
  status shard_forward(void* stats, const saved_buffers& sv, const forward_buffers<T>& fw, cudaStream_t stream) const {
    if (p_.n > 0) CCE_TRY(forward_tiles(sv, fw, true, stream));  // the combine step may be asked for accuracy
    shard_stats_params prm;
    prm.rows.partials = fw.partials;
    prm.rows.splits = pl_.splits;
    prm.rows.target_logit = fw.target_logit;
    prm.n = p_.n;
    prm.labels = labels();
    prm.stats = static_cast<unsigned char*>(stats);
    shard_stats_kernel<><<<std::max(blocks_for(p_.n, 256), 1u), 256, 0, stream>>>(prm);
    return launch_status();
  }

  // The global results from every shard's statistics: outputs, loss and the state the shard backward reads (the
  // split budget of this shard's splits against the rows' global lse_others).
  status combine(const shard_rows& rows, const forward_outputs& out, const saved_buffers& sv,
                 const forward_buffers<T>& fw, cudaStream_t stream) const {
    CCE_TRY(finalise(rows, out, sv, fw, stream));
    return split_skips(sv, fw.partials, fw.target_logit, 0, p_.n, forward_split_cols(true), stream);
  }

  template <class G>
  status backward(loss_gradient grad, const gradients<G>& out, const saved_buffers& sv,
                  const backward_buffers<T>& buffers, cudaStream_t stream) const {
    backward_buffers<T> bw = buffers;
    if (!hopper_) bw.walk_flags = nullptr;  // planned for the sm_90a dlogit kernel
    auto* counts = reinterpret_cast<unsigned long long*>(out.filter_tiles);
    CCE_TRY(start_backward(bw, counts, stream));
    if (p_.n > 0) {
      CCE_TRY(coefficients(grad, sv, bw, 0, p_.n, stream));
      CCE_TRY(baseline_sums(bw, 0, p_.n, stream));
      if (bw.walk_flags) {
        const bool compact = out.de && out.dc;
        CCE_TRY(walk_flags(sv, bw, counts, compact ? pl_.compact_capacity() : 0, stream));
        counts = nullptr;  // counted
        if (compact) CCE_TRY(compact_walk(sv, bw, out, stream));
      }
    }
    const std::int32_t* order = nullptr;  // sorted position -> class
    if (pl_.sort) CCE_TRY(sort_vocabulary(bw, order, stream));
    const std::int64_t ld_de = out.ld_de ? out.ld_de : p_.d, ld_dc = out.ld_dc ? out.ld_dc : p_.d;
    // Chunk `ch` of a pass: the problem's own classes, or (sorted) the chunk's gathered rows.
    auto chunk = [&](const pass_buffers<T>& pb, std::int64_t ch, vocab_slice& s) -> status {
      s = own_classes();
      s.v0 = ch * pb.shape.cols;
      s.cols = std::min(pb.shape.cols, p_.v - s.v0);
      return pl_.sort ? gather(pb, order, s, stream) : status::success;
    };
    vocab_slice s;
    // What a chunk of the fused pass adds besides dE and dC.
    auto class_terms = [&](const pass_buffers<T>& pb) -> status {
      if (out.dbias) CCE_TRY(dbias_sum(bw, pb, s, p_.n, false, out.dbias, stream));
      if (out.db) CCE_TRY(db_product(bw, pb, s, out.db, 0, p_.n, true, true, stream));
      return status::success;
    };
    const bool carried = pl_.carries_in_dc(out.de != nullptr, out.dc, ld_dc);
    if (pl_.mode == backward_mode::chunked || carried) {
      // One fused pass: chunked's, or minimal's carried pass (plan.hpp) with dE's carry in dC's buffer, whose
      // chunks under the carry come last and leave dC for later: the last takes its dC from its dZ, still in the
      // buffer, once it has written dE; the others then recompute their dZ for it.
      const bool shared = carried && pl_.carry_shares_de(hopper_, sizeof(G), out.de, ld_de);
      const pass_buffers<T> pb = carried ? pl_.carried_in(bw.carried, out.dc, shared) : bw.de;
      const std::int64_t under = shared ? pl_.chunks_under_shared_carry : carried ? pl_.chunks_under_carry : 0;
      const std::int64_t chunks = pl_.chunks(pb.shape);
      for (std::int64_t k = 0; k < chunks; ++k) {
        const std::int64_t ch = (under + k) % chunks;
        const bool first = k == 0, last = k + 1 == chunks;
        CCE_TRY(chunk(pb, ch, s));
        CCE_TRY(dlogits(sv, bw, pb, s, 0, p_.n, counts, stream));
        if (p_.has_lora()) CCE_TRY(lora_q_update(bw, pb, s, 0, p_.n, stream));
        if (ch < under) {
          CCE_TRY(de_product(bw, pb, s, out.de, ld_de, 0, p_.n, first, last, stream));
          if (!last) continue;
          CCE_TRY(dc_product(bw, pb, s, out.dc, ld_dc, 0, p_.n, true, true, stream));
        } else {
          CCE_TRY(products(bw, pb, s, out, 0, p_.n, first, last, false, stream));
        }
        CCE_TRY(class_terms(pb));
      }
      for (std::int64_t ch = 0; ch + 1 < under; ++ch) {
        CCE_TRY(chunk(pb, ch, s));
        CCE_TRY(dlogits(sv, bw, pb, s, 0, p_.n, nullptr, stream));
        CCE_TRY(dc_product(bw, pb, s, out.dc, ld_dc, 0, p_.n, true, true, stream));
        CCE_TRY(class_terms(pb));
      }
    } else {
      const pass_buffers<T>& de = bw.de;  // pass 1: dE (and the low-rank q), row blocks outer
      const std::int64_t de_chunks = pl_.chunks(de.shape);
      for (std::int64_t r0 = 0; r0 < p_.n; r0 += de.shape.rows) {
        const std::int64_t rows = std::min(de.shape.rows, p_.n - r0);
        for (std::int64_t ch = 0; ch < de_chunks; ++ch) {
          CCE_TRY(chunk(de, ch, s));
          CCE_TRY(dlogits(sv, bw, de, s, r0, rows, counts, stream));
          if (p_.has_lora()) CCE_TRY(lora_q_update(bw, de, s, r0, rows, stream));
          if (out.de) CCE_TRY(de_product(bw, de, s, out.de, ld_de, r0, rows, ch == 0, ch + 1 == de_chunks, stream));
        }
      }
      const pass_buffers<T>& dc = bw.dc;  // pass 2: dC, dBias, dB (tiles counted in pass 1), chunks outer
      if (out.dc || out.dbias || out.db) {
        for (std::int64_t ch = 0; ch < pl_.chunks(dc.shape); ++ch) {
          CCE_TRY(chunk(dc, ch, s));
          for (std::int64_t r0 = 0; r0 < p_.n; r0 += dc.shape.rows) {
            const std::int64_t rows = std::min(dc.shape.rows, p_.n - r0);
            const bool first = r0 == 0, last = r0 + rows == p_.n;
            CCE_TRY(dlogits(sv, bw, dc, s, r0, rows, nullptr, stream));
            if (out.dc) CCE_TRY(dc_product(bw, dc, s, out.dc, ld_dc, r0, rows, first, last, stream));
            if (out.db) CCE_TRY(db_product(bw, dc, s, out.db, r0, rows, first, last, stream));
          }
          if (out.dbias) CCE_TRY(dbias_sum(bw, dc, s, p_.n, false, out.dbias, stream));
        }
      }
    }
    CCE_TRY(after_walk_products(bw, bw.linear, out, stream));
    if (out.da) CCE_TRY(da_product(bw, out.da, stream));
    return status::success;
  }

  // loss_and_grad keeping the logits of row blocks (plan.hpp, `kept`; the sm_90a forward must be available): per
  // block, the forward writes its logit tiles into the dZ block, the block's rows are finalised, the tiles become
  // dZ in place, and the products follow. dC, dBias are added to the output from the second block on; dB is carried
  // in fp32 as in the other modes.
  template <class G>
  status loss_and_grad(const forward_outputs& out, const gradients<G>& grads, const saved_buffers& sv,
                       const kept_buffers<T>& kb, cudaStream_t stream) const {
    const backward_buffers<T>& bw = kb.bw;
    const pass_buffers<T>& pb = bw.de;
    CCE_TRY(class_weight_total(sv, stream));
    if (p_.n > 0) {  // the mean's normaliser, which every block's gradient needs
      row_weight_kernel<plan::finalise_threads><<<unsigned(pl_.finalise_blocks()), plan::finalise_threads, 0, stream>>>(
          p_.n, labels(), p_.class_weights, kb.fw.block_sums);
      CCE_TRY(launch_status());
    }
    CCE_TRY(loss_total(out, sv, kb.fw.block_sums, stream));
    auto* counts = reinterpret_cast<unsigned long long*>(grads.filter_tiles);
    CCE_TRY(start_backward(bw, counts, stream));
    vocab_slice s = own_classes();
    s.cols = p_.v;
    const std::int64_t blocks = ceil_div(p_.n, pl_.kept_rows);
    for (std::int64_t b = 0; b < blocks; ++b) {
      const std::int64_t r0 = b * pl_.kept_rows, rows = std::min(pl_.kept_rows, p_.n - r0);
      const bool first = b == 0, last = b + 1 == blocks;
      CCE_TRY(kept_forward(sv, kb, r0, rows, out.correct != nullptr, stream));
      split_rows block;
      block.partials = kb.fw.partials;
      block.splits = pl_.splits;
      block.target_logit = kb.fw.target_logit + r0;
      CCE_TRY(finalise_rows(block, out, sv, kb.fw.block_sums, r0, rows, stream));
      CCE_TRY(split_skips(sv, kb.fw.partials, block.target_logit, r0, rows, sm90::forward_shape::bn, stream));
      CCE_TRY(coefficients(loss_gradient{}, sv, bw, r0, rows, stream));
      CCE_TRY(baseline_sums(bw, r0, rows, stream));
      CCE_TRY(kept_dlogits(sv, kb, r0, rows, counts, stream));
      if (p_.has_lora()) CCE_TRY(lora_q_update(bw, pb, s, r0, rows, stream));
      CCE_TRY(products(bw, pb, s, grads, r0, rows, true, true, !first, stream));
      if (grads.dbias) CCE_TRY(dbias_sum(bw, pb, s, rows, !first, grads.dbias, stream));
      if (grads.db) CCE_TRY(db_product(bw, pb, s, grads.db, r0, rows, first, last, stream));
    }
    CCE_TRY(loss_total(out, sv, kb.fw.block_sums, stream));
    CCE_TRY(after_walk_products(bw, bw.linear, grads, stream));
    if (grads.da) CCE_TRY(da_product(bw, grads.da, stream));
    return status::success;
  }

 private:
  const problem<T>& p_;
  const options& o_;
  const plan& pl_;
  bool vec_;
  bool hopper_;

  // What a backward starts from: the low-rank head's lora_p = scale * E A^T and a zero q, zero filter counts, no
  // near-uniform row seen.
  status start_backward(const backward_buffers<T>& bw, unsigned long long* counts, cudaStream_t stream) const {
    if (baseline() &&
        (cudaMemsetAsync(bw.baseline.class_sum, 0, sizeof(float) * p_.d, stream) != cudaSuccess ||
         cudaMemsetAsync(bw.baseline.state, 0, baseline_state_count * sizeof(int), stream) != cudaSuccess)) {
      return status::cuda_error;
    }
    if (p_.has_lora()) {
      if (p_.n > 0) CCE_TRY(lora_project(bw.lora_p, stream));
      if (cudaMemsetAsync(bw.lora_q, 0, sizeof(float) * p_.n * p_.lora.rank, stream) != cudaSuccess) {
        return status::cuda_error;
      }
    }
    if (counts && cudaMemsetAsync(counts, 0, 2 * sizeof(unsigned long long), stream) != cudaSuccess) {
      return status::cuda_error;
    }
    return status::success;
  }

  // The rows' labels; a row block's from its first row r0.
  target_reader labels(std::int64_t r0 = 0) const {
    target_reader r = make_target_reader(p_, o_);
    r.first_row = r0;
    return r;
  }

  // Where the kernels read a vocab chunk's classes [v0, v0 + cols) of the walk from, and where its class gradients
  // go. c, bias, weights and lora_b hold column `base` in their row 0: the problem's own arrays (base 0) or, in the
  // sorted walk, the chunk's gathered copies (base v0), whose gradients are scattered to `classes` (order + v0).
  struct vocab_slice {
    std::int64_t v0 = 0, cols = 0;
    std::int64_t base = 0;
    const T* c = nullptr;
    std::int64_t ldc = 0, rows = 0;  // rows the c pointer holds
    const T* bias = nullptr;
    const float* weights = nullptr;
    const T* lora_b = nullptr;
    std::int64_t ldb = 0;
    const std::int32_t* classes = nullptr;  // class of walk column v0 + j, null: v0 + j itself

    const T* c_rows() const { return c + (v0 - base) * ldc; }
    const T* b_rows() const { return lora_b + (v0 - base) * ldb; }
  };

  vocab_slice own_classes() const {
    vocab_slice s;
    s.c = p_.c;
    s.ldc = p_.c_stride();
    s.rows = p_.v;
    s.bias = p_.bias;
    s.weights = shard_class_weights();
    s.lora_b = p_.lora.b;
    s.ldb = p_.b_stride();
    return s;
  }

  // The sort key of every class (vocab_sort.cuh), the stable descending sort into `order`, its inverse, and the
  // rows' targets as sorted positions.
  status sort_vocabulary(const backward_buffers<T>& bw, const std::int32_t*& order, cudaStream_t stream) const {
    const std::int64_t d = p_.d, v = p_.v, rank = p_.lora.rank;
    float* e_bar = bw.key_inputs;
    if (p_.n > 0) {
      const dim3 grid(blocks_for(d + 1, 128), unsigned(pl_.mean_splits));
      column_sum_kernel<T>
          <<<grid, 128, 0, stream>>>(p_.e, p_.e_stride(), p_.n, d, bw.coef, pl_.mean_splits, bw.mean_partial);
      CCE_TRY(launch_status());
      column_mean_kernel<><<<blocks_for(d + 1, 128), 128, 0, stream>>>(bw.mean_partial, d, pl_.mean_splits, e_bar);
      CCE_TRY(launch_status());
    } else if (cudaMemsetAsync(e_bar, 0, sizeof(float) * (d + 1), stream) != cudaSuccess) {
      return status::cuda_error;
    }
    float* lora_u = e_bar + d + 1;
    if (rank > 0) {  // u = scale * A e_bar
      thin_product<T, float, float> t;
      t.a = p_.lora.a;
      t.a_m = p_.a_stride();
      t.a_k = 1;
      t.b = e_bar;
      t.b_k = 1;
      t.b_n = 0;
      t.m = rank;
      t.n = 1;
      t.k = d;
      t.alpha = p_.lora.scale;
      t.out = lora_u;
      t.out_m = 1;
      CCE_TRY(launch_thin(t, stream));
    }
    sort_key_params<T> kp;
    kp.c = p_.c;
    kp.ldc = p_.c_stride();
    kp.v = v;
    kp.d = d;
    kp.e_bar = e_bar;
    kp.bias = p_.bias;
    kp.lora_b = p_.lora.b;
    kp.lora_u = lora_u;
    kp.rank = rank;
    kp.ldb = p_.b_stride();
    kp.keys = bw.sort_keys[0];
    kp.classes = bw.sort_values[0];
    sort_key_kernel<T><<<blocks_for(v * 32, 256), 256, 0, stream>>>(kp);
    CCE_TRY(launch_status());
    cub::DoubleBuffer<float> keys(bw.sort_keys[0], bw.sort_keys[1]);
    cub::DoubleBuffer<std::int32_t> values(bw.sort_values[0], bw.sort_values[1]);
    std::size_t temp = pl_.sort_temp;
    if (cub::DeviceRadixSort::SortPairsDescending(bw.sort_temp, temp, keys, values, int(v), 0, int(sizeof(float) * 8),
                                                  stream) != cudaSuccess) {
      return status::cuda_error;
    }
    order = values.Current();
    invert_order_kernel<><<<blocks_for(v, 256), 256, 0, stream>>>(order, v, bw.position);
    CCE_TRY(launch_status());
    if (p_.n == 0) return status::success;
    sorted_targets_kernel<><<<blocks_for(p_.n, 256), 256, 0, stream>>>(bw.coef, p_.n, bw.position);
    return launch_status();
  }

  // The sorted walk's chunk s: its classes' rows gathered into the chunk buffers.
  status gather(const pass_buffers<T>& pb, const std::int32_t* order, vocab_slice& s, cudaStream_t stream) const {
    gather_params<T> g;
    g.classes = order + s.v0;
    g.cols = s.cols;
    g.d = p_.d;
    g.c = p_.c;
    g.ldc = p_.c_stride();
    g.bias = p_.bias;
    g.weights = shard_class_weights();
    g.lora_b = p_.lora.b;
    g.rank = p_.lora.rank;
    g.ldb = p_.b_stride();
    g.c_out = pb.c_sorted;
    g.bias_out = p_.bias ? pb.bias_sorted : nullptr;
    g.weights_out = g.weights ? pb.weights_sorted : nullptr;
    g.b_out = pb.b_sorted;
    gather_classes_kernel<T><<<unsigned(s.cols), 128, 0, stream>>>(g);
    s.base = s.v0;
    s.c = pb.c_sorted;
    s.ldc = p_.d;
    s.rows = s.cols;
    s.bias = g.bias_out;
    s.weights = g.weights_out;
    s.lora_b = pb.b_sorted;
    s.ldb = p_.lora.rank;
    s.classes = g.classes;
    return launch_status();
  }
  // Class weights as the tile kernels index them: by the problem's own columns.
  const float* shard_class_weights() const { return p_.class_weights ? p_.class_weights + p_.shard.offset : nullptr; }

  // The columns of the forward's split unit (its CTA tile): the sm_90a kernel's, or the portable wide tile's where
  // the device gives a CTA its shared memory, else the policy's. `extras`: the call sums smoothing or the argmax.
  std::int64_t forward_split_cols(bool extras) const {
    if (hopper_) return sm90::forward_shape::bn;
    if constexpr (has_wide_tiles<T, Policy>) {
      using wide = wide_policy<Policy>;
      const std::size_t smem = forward_smem_bytes<T, wide>(extras || o_.label_smoothing != 0.f);
      if (vec_ && allow_dynamic_smem<forward_kernel<T, wide, true, 2>>(smem, forward_smem_bytes<T, wide>(true)))
        return wide::bn;
    }
    return Policy::bn;
  }
  // Logit tiles into per-(row, split) partials, the target logits and the filter's tile maxima.
  status forward_tiles(const saved_buffers& sv, const forward_buffers<T>& fw, bool argmax, cudaStream_t stream) const {
    if (p_.has_lora()) CCE_TRY(lora_project(fw.lora_p, stream));
    forward_params<T> prm;
    prm.e = {p_.e, p_.e_stride(), p_.n, p_.d};
    prm.c = {p_.c, p_.c_stride(), p_.v, p_.d};
    prm.terms = terms(fw.lora_p);
    prm.class_weights = shard_class_weights();
    prm.labels = labels();
    prm.grid = pl_.grid;
    prm.splits = pl_.splits;
    prm.smoothing = o_.label_smoothing != 0.f;
    prm.argmax = argmax;
    prm.partials = fw.partials;
    prm.target_logit = fw.target_logit;
    prm.tile_max = pl_.filter ? sv.tile_max : nullptr;
    const dim3 grid(unsigned(pl_.grid.row_tiles()), unsigned(pl_.splits));
    if (hopper_) return sm90::launch_forward(prm, pl_.sm_count, stream);
    const bool extras = prm.smoothing || prm.argmax;
    if constexpr (has_wide_tiles<T, Policy>) {
      using wide = wide_policy<Policy>;
      if (forward_split_cols(extras) == wide::bn) {
        return launch_tile_kernel<forward_kernel<T, wide, true, 2>>(
            grid, wide::threads, forward_smem_bytes<T, wide>(extras), stream, prm, forward_smem_bytes<T, wide>(true));
      }
    }
    const std::size_t smem = forward_smem_bytes<T, Policy>(extras);
    const std::size_t most = forward_smem_bytes<T, Policy>(true);
    return vec_ ? launch_tile_kernel<forward_kernel<T, Policy, true>>(grid, Policy::threads, smem, stream, prm, most)
                : launch_tile_kernel<forward_kernel<T, Policy, false>>(grid, Policy::threads, smem, stream, prm, most);
  }

  // W = sum of the class weights into the saved state, for label smoothing's share; without them W = V, read as such.
  status class_weight_total(const saved_buffers& sv, cudaStream_t stream) const {
    if (!p_.class_weights) return status::success;
    class_weight_total_kernel<256><<<1, 256, 0, stream>>>(p_.class_weights, p_.total_classes(), sv.class_weight_total);
    return launch_status();
  }
  weight_total_reader weight_total(const saved_buffers& sv) const {
    return {p_.class_weights ? sv.class_weight_total : nullptr, float(p_.total_classes())};
  }

  // Per-row outputs and saved state from merged statistics, then the loss and the mean's normaliser.
  template <class Rows>
  status finalise(const Rows& rows, const forward_outputs& out, const saved_buffers& sv,
                  const forward_buffers<T>& fw, cudaStream_t stream) const {
    CCE_TRY(class_weight_total(sv, stream));
    if (p_.n > 0) CCE_TRY(finalise_rows(rows, out, sv, fw.block_sums, 0, p_.n, stream));
    return loss_total(out, sv, fw.block_sums, stream);
  }

  // Rows [r0, r0 + count) of the finaliser, whose row i is `rows`' row i; r0 is a multiple of its blocks.
  template <class Rows>
  status finalise_rows(const Rows& rows, const forward_outputs& out, const saved_buffers& sv, float* block_sums,
                       std::int64_t r0, std::int64_t count, cudaStream_t stream) const {
    finalise_params<Rows> fin;
    fin.rows = rows;
    fin.n = count;
    fin.class_weights = p_.class_weights;
    fin.weight_total = weight_total(sv);
    fin.labels = labels(r0);
    fin.smoothing = o_.label_smoothing;
    fin.z_loss = o_.z_loss;
    fin.inv_classes = 1.f / float(p_.total_classes());
    fin.reduction = o_.reduction;
    fin.lse_saved = sv.lse + r0;
    fin.lse_others_saved = sv.lse_others + r0;
    fin.out = out;
    const auto from_r0 = [&](auto* ptr) { return ptr ? ptr + r0 : ptr; };
    fin.out.lse = from_r0(out.lse);
    fin.out.entropy = from_r0(out.entropy);
    fin.out.target_logprob = from_r0(out.target_logprob);
    fin.out.correct = from_r0(out.correct);
    if (o_.reduction == reduction::none) fin.out.loss = from_r0(out.loss);
    fin.block_sums = block_sums + 2 * (r0 / plan::finalise_threads);
    finalise_kernel<plan::finalise_threads, Rows>
        <<<unsigned(ceil_div(count, plan::finalise_threads)), plan::finalise_threads, 0, stream>>>(fin);
    return launch_status();
  }

  // The filter's split budget for rows [r0, r0 + count) once they are finalised (split_skip.cuh): from the forward's
  // `partials` and target logits of those rows, whose splits are `split_cols` columns wide.
  status split_skips(const saved_buffers& sv, const row_partial* partials, const float* target_logit, std::int64_t r0,
                     std::int64_t count, std::int64_t split_cols, cudaStream_t stream) const {
    if (!pl_.filter || count == 0) return status::success;
    const tile::tile_grid& g = pl_.grid;
    const std::int64_t first_tile = r0 / g.bm, row_tiles = ceil_div(count, std::int64_t(g.bm));
    if (pl_.splits > filter::split_budget::max_splits) {  // too many to rank: none skipped whole
      return cudaMemsetAsync(sv.split_skip + first_tile * g.col_tiles(), 0, std::size_t(row_tiles * g.col_tiles()),
                             stream) == cudaSuccess
                 ? status::success
                 : status::cuda_error;
    }
    split_skip_params prm;
    prm.partials = partials;
    prm.target_logit = target_logit;
    prm.lse_others = sv.lse_others + r0;
    prm.labels = labels(r0);
    prm.tile_max = sv.tile_max;
    prm.first_tile = first_tile;
    prm.grid = g;
    prm.splits = pl_.splits;
    prm.split_cols = split_cols;
    prm.filter = filter_predicate();
    prm.budget = filter::split_budget::make(filter::eps_of<T>(o_), g.col_tiles(), filter_tiles(g, p_.total_classes()));
    prm.skip = sv.split_skip;
    split_skip_kernel<256><<<unsigned(row_tiles), 256, split_skip_smem_bytes(pl_.splits, g.bm), stream>>>(prm);
    return launch_status();
  }

  // The loss (sum or mean) and the mean's normaliser from the finaliser's block sums.
  status loss_total(const forward_outputs& out, const saved_buffers& sv, const float* block_sums,
                    cudaStream_t stream) const {
    loss_total_kernel<256><<<1, 256, 0, stream>>>(block_sums, pl_.finalise_blocks(), o_.reduction, out.loss,
                                                  sv.weight_sum);
    return launch_status();
  }

  // The backward's per-row coefficients of rows [r0, r0 + count) (r0 a multiple of bm), near-uniform rows' with
  // their baseline.
  status coefficients(loss_gradient grad, const saved_buffers& sv, const backward_buffers<T>& bw, std::int64_t r0,
                      std::int64_t count, cudaStream_t stream) const {
    coefficient_params cp;
    cp.n = count;
    cp.labels = labels(r0);
    cp.per_row_grad = o_.reduction == reduction::none;
    cp.grad = grad.grad && cp.per_row_grad ? grad.grad + r0 : grad.grad;
    cp.mean = o_.reduction == reduction::mean;
    cp.weight_sum = sv.weight_sum;
    cp.lse = sv.lse + r0;
    cp.class_weights = p_.class_weights;
    cp.weight_total = weight_total(sv);
    cp.lse_others = sv.lse_others + r0;
    cp.smoothing = o_.label_smoothing;
    cp.z_loss = o_.z_loss;
    cp.inv_classes = 1.f / float(p_.total_classes());
    cp.coef = bw.coef + r0;
    if (baseline()) {
      const std::int64_t first_tile = r0 / pl_.grid.bm, tiles = ceil_div(count, std::int64_t(pl_.grid.bm));
      row_tile_max_kernel<256><<<unsigned(tiles), 256, 0, stream>>>(sv.tile_max, pl_.grid.col_tiles(), first_tile,
                                                                    bw.baseline.block_max);
      CCE_TRY(launch_status());
      cp.block_max = bw.baseline.block_max;
      cp.first_row = r0;
      cp.bm = pl_.grid.bm;
      cp.uniform = filter::near_uniform_of<T>(o_, p_.total_classes());
      cp.inv_temperature = 1.f / o_.temperature;
      cp.row_scale = bw.baseline.row_scale + r0;
      cp.baseline_state = bw.baseline.state;
      if (lone()) {  // with the share, the rows that take a baseline also leave their one-hot term to after the walk
        cp.target_scale = bw.baseline.target_scale + r0;
        cp.target_class = bw.baseline.target_class + r0;
        cp.baseline_targets_apart = linear();
      }
      if (linear()) {
        cp.linear = filter::near_uniform_linear_of<T>(o_, p_.v);
        cp.linear_scale = bw.baseline.linear_scale + r0;
      }
    }
    coefficients_kernel<><<<blocks_for(count, 256), 256, 0, stream>>>(cp);
    CCE_TRY(launch_status());
    if (linear()) CCE_TRY(linear_rows(bw, cp, r0, count, stream));
    return lone() ? lone_targets(sv, bw, r0, count, stream) : status::success;
  }

  // The rows of [r0, r0 + count) whose target tile the filter skips but for the target leave its term to the
  // updates after the walk (lone_targets.cuh).
  status lone_targets(const saved_buffers& sv, const backward_buffers<T>& bw, std::int64_t r0, std::int64_t count,
                      cudaStream_t stream) const {
    lone_target_params prm;
    prm.e = p_.e + r0 * p_.e_stride();
    prm.c = p_.c;
    prm.lde = p_.e_stride();
    prm.ldc = p_.c_stride();
    prm.n = count;
    prm.d = p_.d;
    prm.grid = pl_.grid;
    prm.first_tile = r0 / pl_.grid.bm;
    prm.tile_max = sv.tile_max;
    prm.split_skip = sv.split_skip;
    prm.filter = filter_predicate();
    prm.transform = {o_.softcap, 1.f / o_.temperature};
    prm.coef = bw.coef;
    prm.target_scale = bw.baseline.target_scale + r0;
    prm.target_class = bw.baseline.target_class + r0;
    prm.state = bw.baseline.state;
    const dim3 grid(unsigned(ceil_div(count, std::int64_t(pl_.grid.bm))), unsigned(lone_target_ctas_per_tile));
    lone_targets_kernel<T, 128><<<grid, 128, 0, stream>>>(prm);
    return launch_status();
  }

  // The first-order test of rows [r0, r0 + count) (linear_rows_kernel) after the coefficients `cp`, once a row may
  // pass it: it needs the class sums.
  status linear_rows(const backward_buffers<T>& bw, const coefficient_params& cp, std::int64_t r0, std::int64_t count,
                     cudaStream_t stream) const {
    CCE_TRY(class_sums(bw, stream));
    linear_rows_params lp;
    lp.e = p_.e + r0 * p_.e_stride();
    lp.lde = p_.e_stride();
    lp.n = count;
    lp.d = p_.d;
    lp.class_sum = bw.baseline.class_sum;
    lp.class_mean = bw.baseline.class_mean;
    lp.inv_classes = 1.f / float(p_.v);
    lp.inv_temperature = 1.f / o_.temperature;
    lp.test = cp.linear;
    lp.coef = cp.coef;
    lp.row_scale = cp.row_scale;
    lp.linear_scale = cp.linear_scale;
    lp.target_scale = cp.target_scale;
    lp.target_class = cp.target_class;
    lp.state = bw.baseline.state;
    linear_rows_kernel<T><<<blocks_for(32 * count, 256), 256, 0, stream>>>(lp);
    return launch_status();
  }

  // The rows of each class whose one-hot term is added after the walk (uniform_baseline.cuh).
  status class_index(const backward_buffers<T>& bw, cudaStream_t stream) const {
    const uniform_baseline_buffers& b = bw.baseline;
    const std::int64_t n = p_.n, v = p_.v;
    if (cudaMemsetAsync(b.class_offsets, 0, sizeof(std::int32_t) * (v + 1), stream) != cudaSuccess ||
        cudaMemsetAsync(b.class_fill, 0, sizeof(std::int32_t) * v, stream) != cudaSuccess) {
      return status::cuda_error;
    }
    const float* scale = b.target_scale;
    const std::int32_t* cls = b.target_class;
    class_count_kernel<><<<blocks_for(n, 256), 256, 0, stream>>>(scale, cls, n, b.class_offsets, b.state);
    CCE_TRY(launch_status());
    class_offsets_kernel<1024, 8><<<1, 1024, 0, stream>>>(b.class_offsets, v, b.state);
    CCE_TRY(launch_status());
    class_place_kernel<><<<blocks_for(n, 256), 256, 0, stream>>>(scale, cls, n, 0, b.class_offsets, b.class_fill,
                                                                 b.class_rows, b.state);
    CCE_TRY(launch_status());
    class_sort_kernel<><<<blocks_for(v, 256), 256, 0, stream>>>(b.class_offsets, v, b.class_rows, b.state);
    return launch_status();
  }

  // Whether near-uniform rows take a baseline: as planned, and over the whole vocabulary (a shard's tile maxima
  // do not bound the other shards' probabilities); and to first order where they qualify (linear_rows_kernel).
  bool baseline() const { return pl_.baseline && p_.total_classes() == p_.v; }
  bool linear() const { return baseline() && pl_.linear(); }
  // Whether rows may leave their target's term to the updates after the walk (lone_targets.cuh).
  bool lone() const { return baseline() && pl_.linear_rows; }

  // The column sums of C (uniform_baseline.cuh), once a row is near-uniform or may be to first order.
  status class_sums(const backward_buffers<T>& bw, cudaStream_t stream) const {
    const uniform_baseline_buffers& b = bw.baseline;
    const std::int64_t d = p_.d;
    const std::int64_t class_splits = baseline_splits(p_.v);
    baseline_partial_kernel<T, baseline_sum::classes>
        <<<baseline_partial_grid(d, class_splits), 32 * baseline_warps, 0, stream>>>(
            p_.c, p_.c_stride(), p_.v, d, nullptr, class_splits, b.state, b.partial);
    CCE_TRY(launch_status());
    if (linear() && o_.softcap > 0.f) {  // the first-order test's bound on the logits
      const unsigned blocks = unsigned(std::min<std::int64_t>(ceil_div(p_.v, 8), 8 * std::int64_t(pl_.sm_count)));
      class_norm_kernel<T><<<blocks, 256, 0, stream>>>(p_.c, p_.c_stride(), p_.v, d, b.state);
      CCE_TRY(launch_status());
    }
    baseline_total_kernel<baseline_sum::classes><<<blocks_for(d, 256), 256, 0, stream>>>(b.partial, d, d,
                                                                                       class_splits, b.state,
                                                                                       b.class_sum);
    return launch_status();
  }

  // The baseline's column sums for the products of rows [r0, r0 + count) (uniform_baseline.cuh): C's, once a row is
  // near-uniform, and these rows' baselines times E.
  status baseline_sums(const backward_buffers<T>& bw, std::int64_t r0, std::int64_t count, cudaStream_t stream) const {
    if (!baseline()) return status::success;
    const uniform_baseline_buffers& b = bw.baseline;
    const std::int64_t d = p_.d;
    const std::int64_t row_splits = baseline_splits(count);
    CCE_TRY(class_sums(bw, stream));
    baseline_partial_kernel<T, baseline_sum::rows>
        <<<baseline_partial_grid(d, row_splits), 32 * baseline_warps, 0, stream>>>(
            p_.e + r0 * p_.e_stride(), p_.e_stride(), count, d, b.row_scale + r0, row_splits, b.state, b.partial);
    CCE_TRY(launch_status());
    baseline_total_kernel<baseline_sum::rows><<<blocks_for(d + 1, 256), 256, 0, stream>>>(b.partial, d, d + 1,
                                                                                        row_splits, b.state,
                                                                                        b.row_sums);
    return launch_status();
  }

  // The logit-keeping forward of rows [r0, r0 + rows): partials of the block, its logits into the dZ block.
  status kept_forward(const saved_buffers& sv, const kept_buffers<T>& kb, std::int64_t r0, std::int64_t rows,
                      bool argmax, cudaStream_t stream) const {
    forward_params<T> prm;
    prm.e = {p_.e + r0 * p_.e_stride(), p_.e_stride(), rows, p_.d};
    prm.c = {p_.c, p_.c_stride(), p_.v, p_.d};
    prm.terms = terms(kb.fw.lora_p + r0 * p_.lora.rank);
    prm.class_weights = shard_class_weights();
    prm.labels = labels(r0);
    prm.grid = tile::tile_grid{rows, p_.v, pl_.grid.bm, pl_.grid.bn};
    prm.splits = pl_.splits;
    prm.smoothing = o_.label_smoothing != 0.f;
    prm.argmax = argmax;
    prm.partials = kb.fw.partials;
    prm.target_logit = kb.fw.target_logit + r0;
    prm.tile_max = pl_.filter ? block_tile_max(sv, r0) : nullptr;
    const pass_buffers<T>& pb = kb.bw.de;
    const sm90::kept_logits kept{reinterpret_cast<__half*>(pb.dz), pb.shape.cols, kb.logit_ref, kept_ref_ld()};
    return sm90::launch_forward(prm, pl_.sm_count, stream, &kept);
  }

  // The kept logits of rows [r0, r0 + rows) into dZ, in place: the filter's flags (counted into `counts`), then
  // the live tiles with their bias column sums.
  status kept_dlogits(const saved_buffers& sv, const kept_buffers<T>& kb, std::int64_t r0, std::int64_t rows,
                      unsigned long long* counts, cudaStream_t stream) const {
    if constexpr (sizeof(T) != 2) {
      return status::unsupported_arch;  // plan_kept_logits plans 16-bit inputs only
    } else {
      const pass_buffers<T>& pb = kb.bw.de;
      const tile::tile_grid grid{rows, p_.v, pl_.grid.bm, pl_.grid.bn};
      dlogit_params<T> flags;
      flags.coef = kb.bw.coef + r0;
      flags.grid = grid;
      flags.tile_max = filters() ? block_tile_max(sv, r0) : nullptr;
      flags.split_skip = sv.split_skip + (r0 / pl_.grid.bm) * pl_.grid.col_tiles();
      flags.filter = filter_predicate();
      flags.tile_counts = counts;
      flags.chunk_cols = pb.shape.cols;
      flags.active = pb.active;
      flags.significant = pb.significant;
      flags.dbias_partial = pb.dbias_partial;
      tile_flags_kernel<T><<<tile_flags_grid(rows, pb.shape.cols, grid), 128, 0, stream>>>(flags);
      CCE_TRY(launch_status());
      sm90::kept_dlogit_params<T> prm;
      prm.dz = pb.dz;
      prm.ld = pb.shape.cols;
      prm.ref = kb.logit_ref;
      prm.ref_ld = kept_ref_ld();
      prm.coef = flags.coef;
      prm.class_weights = shard_class_weights();
      prm.transform = terms(nullptr).transform;
      prm.grid = grid;
      prm.active = pb.active;
      prm.dbias_partial = pb.dbias_partial;
      sm90::kept_dlogit_kernel<T><<<dim3(unsigned(grid.row_tiles()), unsigned(grid.col_tiles())),
                                    sm90::kept_dlogit_threads, 0, stream>>>(prm);
      return launch_status();
    }
  }
  std::int64_t kept_ref_ld() const { return ceil_div(p_.v, std::int64_t(plan::kept_ref_cols)); }
  float* block_tile_max(const saved_buffers& sv, std::int64_t r0) const {
    return sv.tile_max + (r0 / pl_.grid.bm) * pl_.grid.col_tiles();
  }

  // Whether the backward filters: smoothing spreads gradient over every class, so no tile is negligible then.
  bool filters() const { return pl_.filter && o_.label_smoothing == 0.f; }
  filter::mass_threshold filter_predicate() const {
    return filter::mass_threshold::make(filter::eps_of<T>(o_), pl_.grid.bn, filter_tiles(pl_.grid, p_.total_classes()));
  }
  logit_terms<T> terms(const float* lora_p) const { return make_logit_terms(p_, o_, lora_p); }

  template <class TA, class TB, class G>
  static status launch_thin(const thin_product<TA, TB, G>& prm, cudaStream_t stream) {
    if (prm.m * prm.n == 0) return status::success;
    thin_product_kernel<TA, TB, G><<<blocks_for(prm.m * prm.n, 256), 256, 0, stream>>>(prm);
    return launch_status();
  }

  // lora_p = scale * E A^T.
  status lora_project(float* lora_p, cudaStream_t stream) const {
    thin_product<T, T, float> t;
    t.a = p_.e;
    t.a_m = p_.e_stride();
    t.a_k = 1;
    t.b = p_.lora.a;
    t.b_k = 1;
    t.b_n = p_.a_stride();
    t.m = p_.n;
    t.n = p_.lora.rank;
    t.k = p_.d;
    t.alpha = p_.lora.scale;
    t.out = lora_p;
    t.out_m = p_.lora.rank;
    return launch_thin(t, stream);
  }

  // Every tile's flag of the walk into bw.walk_flags (walk_flags_kernel), counted into `counts`; with a capacity,
  // the live tiles' slots of the compacted walk and its state.
  status walk_flags(const saved_buffers& sv, const backward_buffers<T>& bw, unsigned long long* counts,
                    std::int64_t slot_capacity, cudaStream_t stream) const {
    dlogit_params<T> prm;
    prm.coef = bw.coef;
    prm.grid = pl_.grid;
    prm.tile_max = filters() ? sv.tile_max : nullptr;
    prm.split_skip = sv.split_skip;
    prm.filter = filter_predicate();
    prm.tile_counts = counts;
    prm.active = bw.walk_flags;
    prm.active_ld = pl_.grid.col_tiles();
    prm.compact = bw.compact;
    prm.slot_capacity = slot_capacity;
    prm.sum_row_bytes = std::int64_t(sizeof(float)) * p_.d;
    prm.sum_rows = pl_.compact_sum_rows(sizeof(T));
    if (slot_capacity > 0 &&
        cudaMemsetAsync(bw.compact.state, 0, sizeof(int) * compact_state_count, stream) != cudaSuccess)
      return status::cuda_error;
    walk_flags_kernel<T><<<unsigned(pl_.grid.row_tiles()), 128, 0, stream>>>(prm);
    return launch_status();
  }

  // The compacted walk (plan.hpp): every live tile's dZ at its slot in one launch, then dE and dC of all rows and
  // classes from the slots in one persistent launch; both return at once unless walk_flags_kernel found that the
  // live tiles fit, and the chunk walk's launches, which follow, run only if they did not (bw.chunk_walk_on). Where
  // the sm_90a kernels cannot take the whole walk, nothing is launched and the chunk walk runs as it would.
  template <class G>
  status compact_walk(const saved_buffers& sv, backward_buffers<T>& bw, const gradients<G>& out,
                      cudaStream_t stream) const {
    const std::int64_t capacity = pl_.compact_capacity(), rows = capacity * pl_.grid.bm;  // the slots' rows
    if (capacity == 0 || rows > std::numeric_limits<std::int32_t>::max()) return status::success;
    T* const dz = bw.de.dz;  // each pass's dZ buffer starts the passes' region
    const int* const on = bw.compact.state + 2;
    vocab_slice s = own_classes();
    s.cols = p_.v;
    const std::int64_t ld_de = out.ld_de ? out.ld_de : p_.d, ld_dc = out.ld_dc ? out.ld_dc : p_.d;
    product_params<G> de = de_params(bw, bw.de, s, out.de, ld_de, 0, p_.n, true, true);
    de.a = {dz, pl_.grid.bn, rows, pl_.grid.bn};  // bn classes deep, K-major
    de.acc = de.comp = nullptr;
    de.enabled = on;
    product_params<G> dc = dc_params(bw, bw.de, s, out.dc, ld_dc, 0, p_.n, true, true, false);
    dc.a = {dz, pl_.grid.bn, pl_.grid.bn, rows};  // MN-major
    dc.enabled = on;
    sm90::grad_gemm_pair_params_sm90<T, G> products;
    const sm90::compact_slots slots{bw.compact, pl_.grid.col_tiles()};
    // The split parts' sums in the slots the live tiles leave free, as fp32 rows of D (walk_flags_kernel).
    float* const sums = reinterpret_cast<float*>(dz);
    if (!sm90::prepare_compact_products(products, de, dc, slots, sums, pl_.compact_sum_rows(sizeof(T)),
                                        pl_.compact_parts()))
      return status::success;

    dlogit_params<T> prm = dlogit_params_of(sv, bw, bw.de, s, 0, nullptr);
    prm.dz = dz;
    prm.slots = bw.compact.slot;
    prm.enabled = on;
    const status st = sm90::launch_dlogits(prm, p_.n, p_.v, pl_.sm_count, true, stream);
    if (st == status::unsupported_arch) return status::success;
    CCE_TRY(st);
    CCE_TRY(sm90::launch_compact_products(products, bw.compact.state + 4, pl_.sm_count, stream));
    sm90::part_sums_params<G> total;
    total.sums = sums;
    total.compact = slots;
    total.n = p_.n;
    total.d = p_.d;
    total.ld_out = ld_de;
    total.out = out.de;
    total.accumulate = de.accumulate;
    total.baseline_rows = de.baseline_rows;
    total.baseline_term = de.baseline_term;
    sm90::compact_part_sums_kernel<G><<<unsigned(4 * pl_.sm_count), 256, 0, stream>>>(total);
    CCE_TRY(launch_status());
    bw.chunk_walk_on = bw.compact.state + 3;
    return status::success;
  }

  // dZ of rows [r0, r0 + rows) and the slice's classes, with the filter's tile flags (counted into `counts`), or
  // those of bw.walk_flags.
  status dlogits(const saved_buffers& sv, const backward_buffers<T>& bw, const pass_buffers<T>& pb,
                 const vocab_slice& s, std::int64_t r0, std::int64_t rows, unsigned long long* counts,
                 cudaStream_t stream) const {
    const std::int64_t cols = s.cols;
    dlogit_params<T> prm = dlogit_params_of(sv, bw, pb, s, r0, counts);
    if (pl_.split_filter) {  // the filter's decision into its own flags, then every tile with gradient is computed
      prm.significant = pb.significant;
      tile_flags_kernel<T><<<tile_flags_grid(rows, pb.shape.cols, pl_.grid), 128, 0, stream>>>(prm);
      CCE_TRY(launch_status());
      prm.tile_max = nullptr;
      prm.tile_counts = nullptr;
      prm.significant = nullptr;
    }
    // The sm_90a kernel takes its flags from the forward's maxima before loading; the sorted walk runs the
    // portable kernel, which decides from the recomputed tile (docs/api.md).
    if (hopper_ && !pl_.sort) {
      const bool flags_written = pl_.split_filter || bw.walk_flags != nullptr;
      const status st = sm90::launch_dlogits(prm, rows, cols, pl_.sm_count, flags_written, stream);
      if (st != status::unsupported_arch) return st;
    }
    const dim3 grid(unsigned(ceil_div(rows, Policy::bm)), unsigned(ceil_div(cols, Policy::bn)));
    return vec_ ? launch_tile_kernel<dlogit_kernel<T, Policy, true>>(grid, Policy::threads, dz_smem, stream, prm)
                : launch_tile_kernel<dlogit_kernel<T, Policy, false>>(grid, Policy::threads, dz_smem, stream, prm);
  }
  // The parameters of dlogits (the chunk walk's launches run only if bw.chunk_walk_on says so).
  dlogit_params<T> dlogit_params_of(const saved_buffers& sv, const backward_buffers<T>& bw, const pass_buffers<T>& pb,
                                    const vocab_slice& s, std::int64_t r0, unsigned long long* counts) const {
    const std::int64_t v0 = s.v0;
    dlogit_params<T> prm;
    prm.e = {p_.e, p_.e_stride(), p_.n, p_.d};
    prm.c = {s.c, s.ldc, s.rows, p_.d};
    prm.terms = terms(bw.lora_p);
    prm.terms.bias = s.bias;
    prm.terms.lora_b = s.lora_b;
    prm.terms.ldb = s.ldb;
    prm.class_weights = s.weights;
    prm.col_base = s.base;
    prm.coef = bw.coef;
    prm.grid = pl_.grid;
    // The sorted walk's tiles are not the forward's: their max logit is taken from the recomputed tile.
    prm.tile_max = filters() && !pl_.sort ? sv.tile_max : nullptr;
    prm.split_skip = sv.split_skip;
    prm.filter_in_tile = filters() && pl_.sort;
    prm.filter = filter_predicate();
    prm.row0 = r0;
    prm.v0 = v0;
    prm.chunk_cols = pb.shape.cols;
    prm.dz = pb.dz;
    prm.active = pb.active;
    if (bw.walk_flags) {
      prm.active = walk_flags_at(bw, r0, v0);
      prm.active_ld = pl_.grid.col_tiles();
    }
    prm.dbias_partial = pb.dbias_partial;  // null in the dE pass
    prm.tile_counts = counts;
    prm.enabled = bw.chunk_walk_on;
    return prm;
  }

  // The walk's flag of the tile at (r0, v0).
  std::uint8_t* walk_flags_at(const backward_buffers<T>& bw, std::int64_t r0, std::int64_t v0) const {
    return bw.walk_flags + (r0 / pl_.grid.bm) * pl_.grid.col_tiles() + v0 / pl_.grid.bn;
  }

  // The dZ tiles a product of the block at (r0, v0) reads: those computed, or with one gradient filtered
  // (options::filter_de, filter_dc), those the filter keeps for that gradient's product.
  active_k_tiles<Policy::bm> flags(const backward_buffers<T>& bw, const pass_buffers<T>& pb, std::int64_t r0,
                                   std::int64_t v0, bool k_is_vocab, bool filtered) const {
    active_k_tiles<Policy::bm> a;  // bm == bn: one flag covers bm rows or bn classes along K
    a.flags = filtered && pb.significant ? pb.significant : pb.active;
    a.chunk_tiles = pb.shape.cols / Policy::bn;
    if (bw.walk_flags) {
      a.flags = walk_flags_at(bw, r0, v0);
      a.chunk_tiles = pl_.grid.col_tiles();
    }
    a.k_is_vocab = k_is_vocab;
    return a;
  }

  // `queue`: the tile counter the sm_90a product may run persistent with.
  template <class G, major MajorA, major MajorB>
  status gemm(grad_gemm_params<T, G, Policy::bm>& prm, cudaStream_t stream, int* queue = nullptr) const {
    if (hopper_) {
      const status st = sm90::launch_grad_gemm<T, G, Policy::bm, MajorA, MajorB>(prm, stream, queue, pl_.sm_count);
      if (st != status::unsupported_arch || prm.carry_shares_output) return st;  // the portable kernels cannot
    }
    using loop = mainloop_for<T, Policy, MajorA, MajorB>;
    const dim3 grid(unsigned(ceil_div(prm.m, Policy::bm)), unsigned(ceil_div(prm.n, Policy::bn)));
    const bool vec = vec_ && prm.a.ld <= max_vector_ld<T> && prm.b.ld <= max_vector_ld<T>;  // dZ's: a chunk's width
    return vec ? launch_tile_kernel<grad_gemm_kernel<T, G, Policy, MajorA, MajorB, true>>(
                      grid, Policy::threads, loop::smem_bytes, stream, prm)
                : launch_tile_kernel<grad_gemm_kernel<T, G, Policy, MajorA, MajorB, false>>(
                      grid, Policy::threads, loop::smem_bytes, stream, prm);
  }

  template <class G>
  using product_params = grad_gemm_params<T, G, Policy::bm>;

  // What is added once the walk is done with the region that holds `lb`: the first-order baseline's share of the
  // gradients (row_loss.hpp), when a row took one (state[0]); then the one-hot terms left to after the walk, by the
  // rows that take a baseline and by the lone targets (lone_targets.cuh). With s the column sums of C, l the rows'
  // linear_scale and t their target_scale: dE += diag(l) E (C^T C - s s^T / V) (the symmetric matrix formed on and
  // above its diagonal), dC += C H - (s / V) H with H = E^T diag(l) E, formed over slabs of its columns; then
  // dE row i -= t_i c_y and dC row y -= the sum over class y's rows of t_i e_i. Each adds to the output rounded as
  // it is (a 16-bit gradient is rounded once more per update).
  template <class G>
  status after_walk_products(const backward_buffers<T>& bw, const linear_baseline_buffers<T>& lb,
                             const gradients<G>& out, cudaStream_t stream) const {
    if (!lone() || p_.n == 0) return status::success;
    if (linear()) CCE_TRY(share_products(bw, lb, out, stream));
    const uniform_baseline_buffers& b = bw.baseline;
    const std::int64_t n = p_.n, d = p_.d, v = p_.v;
    if (out.de) {
      const std::int64_t ld = out.ld_de ? out.ld_de : d;
      onehot_rows_kernel<T><<<blocks_for(32 * n, 256), 256, 0, stream>>>(b.target_scale, b.target_class, n, p_.c,
                                                                         p_.c_stride(), d, out.de, ld, b.state);
      CCE_TRY(launch_status());
    }
    if (!out.dc) return status::success;
    CCE_TRY(class_index(bw, stream));
    const std::int64_t ld = out.ld_dc ? out.ld_dc : d;
    onehot_classes_kernel<T><<<blocks_for(32 * v, 256), 256, 0, stream>>>(
        b.target_scale, b.class_offsets, b.class_rows, v, p_.e, p_.e_stride(), d, out.dc, ld, b.state);
    return launch_status();
  }

  // The first-order share's products of after_walk_products, each run only where a row took the baseline (state[0]);
  // persistent on sm_90a.
  template <class G>
  status share_products(const backward_buffers<T>& bw, const linear_baseline_buffers<T>& lb, const gradients<G>& out,
                        cudaStream_t stream) const {
    const uniform_baseline_buffers& b = bw.baseline;
    const std::int64_t n = p_.n, d = p_.d, v = p_.v;
    auto product = [&](auto* to, std::int64_t ld, operand<T> a, operand<T> bop, std::int64_t m, std::int64_t cols,
                       std::int64_t k, bool add) {
      product_params<std::remove_pointer_t<decltype(to)>> prm;
      prm.a = a;
      prm.b = bop;
      prm.m = m;
      prm.n = cols;
      prm.k = k;
      prm.accumulate = add;
      prm.out = to;
      prm.ld_out = ld;
      prm.enabled = b.state;
      return prm;
    };
    if (out.de) {
      auto gram = product(lb.gram, d, {p_.c, p_.c_stride(), d, v}, {p_.c, p_.c_stride(), d, v}, d, d, v, false);
      gram.upper = true;
      const status parts =
          symmetric_in_parts(gram, lb.gram_sums, lb.gram_carries, b.class_sum, b.class_mean, b, lb, stream);
      if (parts == status::unsupported_arch) {
        gram.baseline_rows = b.class_sum;
        gram.baseline_term = b.class_mean;
        CCE_TRY((gemm<T, major::mn, major::mn>(gram, stream, lb.tile_queue)));
        mirror(lb.gram, b.state, stream);
        CCE_TRY(launch_status());
      } else {
        CCE_TRY(parts);
      }
      auto de = product(out.de, out.ld_de ? out.ld_de : d, {p_.e, p_.e_stride(), n, d}, {lb.gram, d, d, d}, n, d, d,
                        true);
      de.row_scale = b.linear_scale;
      CCE_TRY((gemm<G, major::k, major::mn>(de, stream, lb.tile_queue)));
    }
    if (!out.dc) return status::success;
    const std::int64_t w = pl_.linear_slab_cols;
    for (std::int64_t j0 = 0; j0 < d; j0 += w) {
      const std::int64_t cols = std::min(w, d - j0);
      const unsigned rows = unsigned(std::min<std::int64_t>(n, 8 * std::int64_t(pl_.sm_count)));
      scaled_slab_kernel<T><<<rows, 256, 0, stream>>>(p_.e, p_.e_stride(), n, j0, cols, w, b.linear_scale, b.state,
                                                      lb.slab);
      CCE_TRY(launch_status());
      // H is symmetric: the slab's rows up to its last column, on and above the diagonal; mirrored below.
      const std::int64_t rows_needed = std::min(d, j0 + cols);
      auto h = product(lb.gram + j0, d, {p_.e, p_.e_stride(), rows_needed, n}, {lb.slab, w, cols, n}, rows_needed,
                       cols, n, false);
      h.upper = true;
      h.diagonal_col = j0;
      const status parts =
          symmetric_in_parts(h, lb.row_gram_sums, lb.row_gram_carries, nullptr, nullptr, b, lb, stream);
      if (parts != status::unsupported_arch) {
        CCE_TRY(parts);  // rounded and mirrored
        break;
      }
      CCE_TRY((gemm<T, major::mn, major::mn>(h, stream, lb.tile_queue)));
      if (j0 + cols == d) {
        mirror(lb.gram, b.state, stream);
        CCE_TRY(launch_status());
      }
    }
    // gram_term = -(s / V) H: H's rows weighted by class_mean, in the baseline's column sums.
    const std::int64_t splits = baseline_splits(d);
    baseline_partial_kernel<T, baseline_sum::rows>
        <<<baseline_partial_grid(d, splits), 32 * baseline_warps, 0, stream>>>(lb.gram, d, d, d, b.class_mean, splits,
                                                                               b.state, b.partial);
    CCE_TRY(launch_status());
    baseline_total_kernel<baseline_sum::rows>
        <<<blocks_for(d, 256), 256, 0, stream>>>(b.partial, d, d, splits, b.state, b.gram_term);
    CCE_TRY(launch_status());
    auto dc = product(out.dc, out.ld_dc ? out.ld_dc : d, {p_.c, p_.c_stride(), v, d}, {lb.gram, d, d, d}, v, d, d,
                      true);
    dc.baseline_term = b.gram_term;
    return gemm<G, major::k, major::mn>(dc, stream, lb.tile_queue);
  }

  // A symmetric D x D product `m` (the upper one of a whole D x D output: C^T C, or the rows' Gram matrix from a slab
  // of all D) in parts of its depth on the sm_90a persistent kernel, where that balances its tiles better and
  // `carries` fp32 sums fit at `sums` (sm90::symmetric_k_splits); then the matrix, with class_sum_i class_mean_j added
  // where class_sum is given (the term C^T C's single product adds in its epilogue), rounded and mirrored into m.out
  // (finish_gram_kernel). unsupported_arch where it does not run that way (the zeros it may have written are then
  // unused).
  status symmetric_in_parts(product_params<T> m, float* sums, std::int64_t carries, const float* class_sum,
                            const float* class_mean, const uniform_baseline_buffers& b,
                            const linear_baseline_buffers<T>& lb, cudaStream_t stream) const {
    const std::int64_t d = p_.d;
    if (!hopper_ || sums == nullptr || d % 4 != 0 || m.m != d || m.n != d) return status::unsupported_arch;
    const int parts = sm90::symmetric_k_splits(d, m.k, pl_.sm_count, carries);
    if (parts < 2) return status::unsupported_arch;
    zero_if_kernel<<<unsigned(4 * pl_.sm_count), 256, 0, stream>>>(reinterpret_cast<float4*>(sums),
                                                                    (parts / 2) * d * d / 4, b.state);
    CCE_TRY(launch_status());
    T* const out = m.out;
    m.acc = sums;  // each pair of parts adds its sums onto the zeros of its carry
    m.first = m.last = false;
    CCE_TRY((sm90::launch_grad_gemm<T, T, Policy::bm, major::mn, major::mn>(m, stream, lb.tile_queue, pl_.sm_count,
                                                                             parts)));
    const unsigned blocks = unsigned(ceil_div(d, std::int64_t(32)));
    finish_gram_kernel<T><<<dim3(blocks, blocks), dim3(32, 8), 0, stream>>>(sums, parts / 2, class_sum, class_mean,
                                                                            out, d, b.state);
    return launch_status();
  }

  // The strictly lower triangle of the D x D matrix m from its upper one, when a row took the share (state[0]).
  void mirror(T* m, const int* state, cudaStream_t stream) const {
    const unsigned blocks = unsigned(ceil_div(p_.d, std::int64_t(32)));
    mirror_lower_kernel<T><<<dim3(blocks, blocks), dim3(32, 8), 0, stream>>>(m, p_.d, state);
  }

  // dE[r0 : r0 + rows] (+)= dZ C[slice] (+ scale * q A on the last chunk); persistent on sm_90a in the passes that
  // have a tile queue (those that pair the products).
  template <class G>
  status de_product(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s, G* de,
                    std::int64_t ld, std::int64_t r0, std::int64_t rows, bool first, bool last,
                    cudaStream_t stream) const {
    product_params<G> prm = de_params(bw, pb, s, de, ld, r0, rows, first, last);
    return gemm<G, major::k, major::mn>(prm, stream, pb.tile_queue);
  }
  template <class G>
  product_params<G> de_params(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s, G* de,
                              std::int64_t ld, std::int64_t r0, std::int64_t rows, bool first, bool last) const {
    const std::int64_t cols = s.cols, ldz = pb.shape.cols;
    product_params<G> prm;
    prm.a = {pb.dz, ldz, rows, ldz};
    prm.b = {s.c_rows(), s.ldc, p_.d, cols};
    prm.m = rows;
    prm.n = p_.d;
    prm.k = cols;
    prm.active = flags(bw, pb, r0, s.v0, true, o_.filter_de);
    prm.acc = pb.acc;  // null when one chunk holds every class
    prm.comp = pb.comp;
    prm.carry_shares_output = pb.carry_shares_de;
    prm.first = first;
    prm.last = last;
    prm.accumulate = o_.accumulate;
    prm.out = de + r0 * ld;
    prm.ld_out = ld;
    prm.enabled = bw.chunk_walk_on;
    if (last && baseline()) {
      prm.baseline_rows = bw.baseline.row_scale + r0;
      prm.baseline_term = bw.baseline.class_sum;
    }
    if (last && p_.has_lora()) {
      prm.lora_q = bw.lora_q + r0 * p_.lora.rank;
      prm.lora_a = p_.lora.a;
      prm.rank = p_.lora.rank;
      prm.lda = p_.a_stride();
      prm.lora_scale = p_.lora.scale;
    }
    return prm;
  }

  // dC[slice's classes] (+)= dZ^T E[r0 : r0 + rows]; `onto_output`: added to dC whatever options::accumulate says.
  // Persistent as de_product.
  template <class G>
  status dc_product(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s, G* dc,
                    std::int64_t ld, std::int64_t r0, std::int64_t rows, bool first, bool last, cudaStream_t stream,
                    bool onto_output = false) const {
    product_params<G> prm = dc_params(bw, pb, s, dc, ld, r0, rows, first, last, onto_output);
    return gemm<G, major::mn, major::mn>(prm, stream, pb.tile_queue);
  }
  template <class G>
  product_params<G> dc_params(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s, G* dc,
                              std::int64_t ld, std::int64_t r0, std::int64_t rows, bool first, bool last,
                              bool onto_output) const {
    const std::int64_t cols = s.cols, ldz = pb.shape.cols;
    product_params<G> prm;
    prm.a = {pb.dz, ldz, ldz, rows};
    prm.b = {p_.e + r0 * p_.e_stride(), p_.e_stride(), p_.d, rows};
    prm.m = cols;
    prm.n = p_.d;
    prm.k = rows;
    prm.active = flags(bw, pb, r0, s.v0, false, o_.filter_dc);
    const bool carry = !(first && last);
    prm.acc = carry ? pb.acc : nullptr;
    prm.comp = carry ? pb.comp : nullptr;
    prm.first = first;
    prm.last = last;
    prm.accumulate = o_.accumulate || onto_output;
    prm.out = s.classes ? dc : dc + s.v0 * ld;
    prm.out_rows = s.classes;
    prm.ld_out = ld;
    prm.enabled = bw.chunk_walk_on;
    if (last && baseline()) prm.baseline_term = bw.baseline.row_sums;  // the walk's rows: those of baseline_sums
    return prm;
  }

  // dE[r0 : r0 + rows] (de_first, de_last as de_product's first, last) and dC (all of it from this block; added to
  // the output with `dc_onto_output`) of one dZ block, those `out` asks for: both in one launch on the sm_90a path
  // (grad_gemm_pair_kernel), else one after the other.
  template <class G>
  status products(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s,
                  const gradients<G>& out, std::int64_t r0, std::int64_t rows, bool de_first, bool de_last,
                  bool dc_onto_output, cudaStream_t stream) const {
    const std::int64_t ld_de = out.ld_de ? out.ld_de : p_.d, ld_dc = out.ld_dc ? out.ld_dc : p_.d;
    if (out.de && out.dc && hopper_) {
      const status st =
          sm90::launch_grad_gemm_pair(de_params(bw, pb, s, out.de, ld_de, r0, rows, de_first, de_last),
                                      dc_params(bw, pb, s, out.dc, ld_dc, r0, rows, true, true, dc_onto_output),
                                      pb.tile_queue, pl_.sm_count, stream);
      if (st != status::unsupported_arch || pb.carry_shares_de) return st;
    }
    if (out.de) CCE_TRY(de_product(bw, pb, s, out.de, ld_de, r0, rows, de_first, de_last, stream));
    if (out.dc) CCE_TRY(dc_product(bw, pb, s, out.dc, ld_dc, r0, rows, true, true, stream, dc_onto_output));
    return status::success;
  }

  // dBias of the slice's classes from the column sums of the `rows` rows' tiles in the pass buffer; added to the
  // output when the call accumulates or `onto_output` (loss_and_grad's blocks after the first).
  template <class G>
  status dbias_sum(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s,
                   std::int64_t rows, bool onto_output, G* dbias, cudaStream_t stream) const {
    const float* every_class = baseline() ? bw.baseline.row_sums + p_.d : nullptr;
    dbias_kernel<G><<<blocks_for(s.cols, 256), 256, 0, stream>>>(pb.dbias_partial, ceil_div(rows, Policy::bm),
                                                                 pb.shape.cols, s.cols, o_.accumulate || onto_output,
                                                                 s.classes ? dbias : dbias + s.v0, s.classes,
                                                                 every_class);
    return launch_status();
  }

  // A thin product whose left operand is the dZ buffer: it skips the tiles the filter left unwritten.
  template <class TB>
  static thin_product<T, TB, float> over_dz(const pass_buffers<T>& pb) {
    thin_product<T, TB, float> t;
    t.dz_active = pb.active;
    t.dz_bm = Policy::bm;
    t.dz_bn = Policy::bn;
    t.dz_chunk_tiles = pb.shape.cols / Policy::bn;
    t.a = pb.dz;
    return t;
  }

  // lora_q[r0 : r0 + rows] += dZ B[slice].
  status lora_q_update(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s,
                       std::int64_t r0, std::int64_t rows, cudaStream_t stream) const {
    const std::int64_t cols = s.cols;
    thin_product<T, T, float> t = over_dz<T>(pb);
    t.a_m = pb.shape.cols;
    t.a_k = 1;
    t.b = s.b_rows();
    t.b_k = s.ldb;
    t.b_n = 1;
    t.m = rows;
    t.n = p_.lora.rank;
    t.k = cols;
    t.out = bw.lora_q + r0 * p_.lora.rank;
    t.out_m = p_.lora.rank;
    t.add = true;
    return launch_thin(t, stream);
  }

  // dB[v0 : v0 + cols] (+)= dZ^T lora_p[r0 : r0 + rows], carried in fp32 over row blocks and folded into the
  // output after the last one.
  template <class G>
  status db_product(const backward_buffers<T>& bw, const pass_buffers<T>& pb, const vocab_slice& s, G* db,
                    std::int64_t r0, std::int64_t rows, bool first, bool last, cudaStream_t stream) const {
    const std::int64_t cols = s.cols;
    thin_product<T, float, float> t = over_dz<float>(pb);
    t.a_transposed = true;
    t.a_m = 1;
    t.a_k = pb.shape.cols;
    t.b = bw.lora_p + r0 * p_.lora.rank;
    t.b_k = p_.lora.rank;
    t.b_n = 1;
    t.m = cols;
    t.n = p_.lora.rank;
    t.k = rows;
    t.out = pb.db_acc;
    t.out_m = p_.lora.rank;
    t.add = !first;
    CCE_TRY(launch_thin(t, stream));
    if (!last) return status::success;
    const std::int64_t count = cols * p_.lora.rank;
    G* out = s.classes ? db : db + s.v0 * p_.lora.rank;
    fold_kernel<G>
        <<<blocks_for(count, 256), 256, 0, stream>>>(pb.db_acc, count, o_.accumulate, out, s.classes, p_.lora.rank);
    return launch_status();
  }

  // dA = scale * q^T E.
  template <class G>
  status da_product(const backward_buffers<T>& bw, G* da, cudaStream_t stream) const {
    thin_product<float, T, G> t;
    t.a = bw.lora_q;
    t.a_m = 1;
    t.a_k = p_.lora.rank;
    t.b = p_.e;
    t.b_k = p_.e_stride();
    t.b_n = 1;
    t.m = p_.lora.rank;
    t.n = p_.d;
    t.k = p_.n;
    t.alpha = p_.lora.scale;
    t.out = da;
    t.out_m = p_.d;
    t.add = o_.accumulate;
    return launch_thin(t, stream);
  }
};

}  // namespace cce::detail
