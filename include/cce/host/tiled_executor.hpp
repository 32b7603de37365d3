// CPU tiled executor: the blockwise algorithm of the GPU kernels, run on the host with the same plan, buffers and
// per-tile primitives (online softmax, row partials, filter predicate, logit transform, dZ coefficients). It
// computes in fp32 like the kernels and rounds dZ to T where they do, so it tests the algorithm on machines
// without a GPU; cce::host::reference_* is the exact float64 ground truth both are compared with.
//
// Pointers in the problem, outputs, gradients and gathered statistics are host pointers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <cce/detail/element_type.hpp>
#include <cce/detail/targets.hpp>
#include <cce/detail/validate.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/epilogue/logit_terms.hpp>
#include <cce/epilogue/logit_transform.hpp>
#include <cce/epilogue/row_loss.hpp>
#include <cce/epilogue/row_output.hpp>
#include <cce/epilogue/shard_stats.hpp>
#include <cce/filter/predicates.hpp>
#include <cce/problem.hpp>
#include <cce/reduce/kahan.hpp>
#include <cce/vocab_shard.hpp>

namespace cce::host {

template <class T>
class tiled_executor {
  static_assert(detail::is_supported_element_v<T>, "T is float, __half or __nv_bfloat16");

 public:
  explicit tiled_executor(options opt, int bm = 16, int bn = 16, device_info dev = {80, 4})
      : opt_(opt), bm_(bm), bn_(bn), dev_(dev) {}

  detail::plan plan_for(const problem<T>& p, std::size_t budget) const {
    return detail::make_plan<T>(p.n, p.d, p.v, p.lora.rank, p.bias != nullptr, opt_, bm_, bn_, dev_, budget,
                                p.class_weights != nullptr);
  }
  std::size_t saved_bytes(const problem<T>& p) const { return plan_for(p, 0).saved_bytes(); }
  std::size_t workspace_bytes(const problem<T>& p, std::size_t budget = 0) const {
    return plan_for(p, budget).template workspace_bytes<T>();
  }

  status forward(const problem<T>& p, const forward_outputs& out, void* saved, std::size_t saved_size,
                 void* workspace, std::size_t workspace_size) const {
    if (status s = detail::validate_problem(p, opt_); s != status::success) return s;
    if (out.loss == nullptr && (opt_.reduction != reduction::none || p.n > 0)) return status::null_pointer;
    if (p.v != p.total_classes()) return status::invalid_option;
    detail::plan pl;
    if (status s = prepare_forward(p, saved, saved_size, workspace, workspace_size, pl); s != status::success) return s;
    const detail::saved_buffers sv = pl.carve_saved(saved);
    const detail::forward_buffers<T> fw = pl.template carve_forward<T>(workspace);
    tile_pass(p, pl, sv, fw);
    finalise(p, pl, split_rows(pl, fw), out, sv, fw);
    split_skips(p, pl, sv, fw);
    return status::success;
  }

  // Vocabulary parallelism, as linear_cross_entropy: this shard's statistics, then the combine step.
  std::size_t shard_stats_bytes(const problem<T>& p) const { return detail::shard_stats_bytes(p.n); }

  status shard_forward(const problem<T>& p, void* stats, std::size_t stats_size, void* saved, std::size_t saved_size,
                       void* workspace, std::size_t workspace_size) const {
    if (status s = detail::validate_problem(p, opt_); s != status::success) return s;
    if (status s = detail::validate_buffer(stats, stats_size, shard_stats_bytes(p)); s != status::success) return s;
    detail::plan pl;
    if (status s = prepare_forward(p, saved, saved_size, workspace, workspace_size, pl); s != status::success) return s;
    const detail::saved_buffers sv = pl.carve_saved(saved);
    const detail::forward_buffers<T> fw = pl.template carve_forward<T>(workspace);
    tile_pass(p, pl, sv, fw);
    const auto label = labels(p);
    const detail::split_rows rows = split_rows(pl, fw);
    auto* bytes = static_cast<unsigned char*>(stats);
    *reinterpret_cast<shard_stats_header*>(bytes) = {p.shard.offset, p.v};
    auto* records = reinterpret_cast<shard_row_stats*>(bytes + detail::shard_rows_offset);
    for (std::int64_t row = 0; row < p.n; ++row) {
      row_partial merged;
      float target_logit = 0.f;
      rows.read(row, label.column(label(row)), merged, target_logit);
      records[row] = detail::make_shard_row_stats(merged, target_logit, p.shard.offset);
    }
    return status::success;
  }

  status combine(const problem<T>& p, const gathered_stats& gathered, const forward_outputs& out, void* saved,
                 std::size_t saved_size, void* workspace, std::size_t workspace_size) const {
    if (status s = detail::validate_problem(p, opt_); s != status::success) return s;
    if (out.loss == nullptr || gathered.data == nullptr) return status::null_pointer;
    detail::shard_rows rows;
    if (status s = detail::make_shard_order(gathered, p.total_classes(), rows.order); s != status::success) return s;
    rows.stride = shard_stats_bytes(p);
    rows.data = static_cast<const unsigned char*>(gathered.data);
    if (gathered.bytes < rows.stride * std::size_t(gathered.ranks)) return status::workspace_too_small;
    if (!detail::aligned_to(gathered.data, 16)) return status::misaligned_pointer;
    detail::plan pl;
    if (status s = prepare_forward(p, saved, saved_size, workspace, workspace_size, pl); s != status::success) return s;
    const detail::saved_buffers sv = pl.carve_saved(saved);
    const detail::forward_buffers<T> fw = pl.template carve_forward<T>(workspace);
    finalise(p, pl, rows, out, sv, fw);
    split_skips(p, pl, sv, fw);  // this shard's splits against the rows' global lse_others
    return status::success;
  }

  // grad.grad: the upstream gradient (1 value for mean/sum, N for none), null for 1.
  template <class G>
  status backward(const problem<T>& p, loss_gradient grad, const gradients<G>& out, const void* saved,
                  std::size_t saved_size, void* workspace, std::size_t workspace_size) const {
    static_assert(std::is_same_v<G, T> || std::is_same_v<G, float>, "gradients are T or float");
    if (status s = detail::validate_problem(p, opt_); s != status::success) return s;
    if (status s = detail::validate_gradients(p, out); s != status::success) return s;
    const detail::plan pl = plan_for(p, workspace_size);
    std::size_t bwd_bytes = 0;
    pl.template carve_backward<T>(nullptr, &bwd_bytes);
    if (status s = detail::validate_buffer(saved, saved_size, pl.saved_bytes()); s != status::success) return s;
    if (status s = detail::validate_buffer(workspace, workspace_size, bwd_bytes); s != status::success) return s;
    const detail::saved_buffers sv = pl.carve_saved(const_cast<void*>(saved));
    detail::backward_buffers<T> bw = pl.template carve_backward<T>(workspace);
    const loss_terms terms = make_terms(p, *sv.class_weight_total);
    const auto label = labels(p);
    const dense_inputs x = densify(p);

    for (std::int64_t row = 0; row < p.n; ++row) {
      const detail::row_label lab = label(row);
      detail::row_coefficients rc;
      rc.lse = sv.lse[row];
      if (lab.kind == detail::row_label::kept) {
        float gr = grad.grad ? grad.grad[opt_.reduction == reduction::none ? row : 0] : 1.f;
        if (opt_.reduction == reduction::mean) gr /= *sv.weight_sum;
        rc.lse_others = sv.lse_others[row];
        rc.dz = make_dlogit_coefficients(terms, gr, rc.lse, class_weight(p, lab.target),
                                         -detail::exp_f(rc.lse_others - rc.lse));
        rc.target = label.column(lab);  // the -1 of p - onehot only in the shard that holds the target
        rc.kept = true;
      }
      bw.coef[row] = rc;
    }
    // Over the whole vocabulary only: a shard's tile maxima do not bound the other shards' probabilities.
    onehots_after_walk apart;  // rows whose first-order share or one-hot term are added after the walk
    if (pl.baseline && p.total_classes() == p.v)
      apart = take_baselines(p, x, pl, sv, bw.baseline, bw.coef);
    else bw.baseline = {};
    if (p.has_lora()) {
      lora_project(p, bw.lora_p);
      std::fill(bw.lora_q, bw.lora_q + p.n * p.lora.rank, 0.f);
    }
    std::int64_t* counts = out.filter_tiles;
    if (counts) counts[0] = counts[1] = 0;
    const std::int32_t* order = pl.sort ? sort_vocabulary(p, pl, bw) : nullptr;
    const std::int64_t ld_de = out.ld_de ? out.ld_de : p.d, ld_dc = out.ld_dc ? out.ld_dc : p.d;
    std::vector<float> gathered;  // the sorted chunk's classifier rows in fp32
    auto chunk = [&](const detail::pass_buffers<T>& pb, std::int64_t ch) {
      vocab_slice s = own_classes(p, x);
      s.v0 = ch * pb.shape.cols;
      s.cols = std::min(pb.shape.cols, p.v - s.v0);
      if (pl.sort) gather(p, pb, order, s, gathered);
      return s;
    };

    // The fused pass, as the GPU path walks it (dispatch/portable.cuh): chunked's, or minimal's carried pass with
    // dE's carry in dC's buffer (on the sm_90a path it may share dE's buffer too, with fewer chunks under it:
    // plan::carry_shares_de).
    const bool carried = pl.carries_in_dc(out.de != nullptr, out.dc, ld_dc);
    if (pl.mode == backward_mode::chunked || carried) {
      const detail::pass_buffers<T> pb = carried ? pl.carried_in(bw.carried, out.dc) : bw.de;
      const std::int64_t under = carried ? pl.chunks_under_carry : 0;
      auto dc_terms = [&](const vocab_slice& s) {
        if (out.dc) dc_update(p, x, s, pl, bw, pb, out, ld_dc, 0, p.n, true, true);
        if (out.dbias) dbias_update(s, pl, bw, pb, out);
        if (out.db) db_update(p, s, pl, bw, pb, out, 0, p.n, true, true);
      };
      const std::int64_t chunks = pl.chunks(pb.shape);
      for (std::int64_t k = 0; k < chunks; ++k) {
        const std::int64_t ch = (under + k) % chunks;
        const vocab_slice s = chunk(pb, ch);
        compute_dz(p, x, s, pl, sv, bw, pb, 0, p.n, counts);
        if (p.has_lora()) lora_accumulate_q(p, s, pl, bw, pb, 0, p.n);
        if (out.de) de_update(p, s, pl, bw, pb, out, ld_de, 0, p.n, k == 0, k + 1 == chunks);
        if (ch >= under || k + 1 == chunks) dc_terms(s);  // the last chunk under the carry: dE is written
      }
      for (std::int64_t ch = 0; ch + 1 < under; ++ch) {
        const vocab_slice s = chunk(pb, ch);
        compute_dz(p, x, s, pl, sv, bw, pb, 0, p.n, nullptr);
        dc_terms(s);
      }
    } else {
      const detail::pass_buffers<T>& de = bw.de;  // pass 1: dE
      const std::int64_t de_chunks = pl.chunks(de.shape);
      for (std::int64_t r0 = 0; r0 < p.n; r0 += de.shape.rows) {
        const std::int64_t rows = std::min(de.shape.rows, p.n - r0);
        for (std::int64_t ch = 0; ch < de_chunks; ++ch) {
          const vocab_slice s = chunk(de, ch);
          compute_dz(p, x, s, pl, sv, bw, de, r0, rows, counts);
          if (p.has_lora()) lora_accumulate_q(p, s, pl, bw, de, r0, rows);
          if (out.de) de_update(p, s, pl, bw, de, out, ld_de, r0, rows, ch == 0, ch + 1 == de_chunks);
        }
      }
      const detail::pass_buffers<T>& dc = bw.dc;  // pass 2: dC, dBias, dB (tiles counted in pass 1)
      for (std::int64_t ch = 0; ch < pl.chunks(dc.shape); ++ch) {
        const vocab_slice s = chunk(dc, ch);
        for (std::int64_t r0 = 0; r0 < p.n; r0 += dc.shape.rows) {
          const std::int64_t rows = std::min(dc.shape.rows, p.n - r0);
          const bool first = r0 == 0, last = r0 + rows == p.n;
          compute_dz(p, x, s, pl, sv, bw, dc, r0, rows, nullptr);
          if (out.dc) dc_update(p, x, s, pl, bw, dc, out, ld_dc, r0, rows, first, last);
          if (out.db) db_update(p, s, pl, bw, dc, out, r0, rows, first, last);
        }
        if (out.dbias) dbias_update(s, pl, bw, dc, out);
      }
    }
    if (apart.share) add_linear_baselines(p, x, bw.baseline, out);
    if (apart.share || apart.lone) add_onehots(p, x, bw.baseline, out);
    if (out.da) da_update(p, bw, out);
    return status::success;
  }

 private:
  options opt_;
  int bm_, bn_;
  device_info dev_;

  status prepare_forward(const problem<T>& p, const void* saved, std::size_t saved_size, const void* workspace,
                         std::size_t workspace_size, detail::plan& pl) const {
    pl = plan_for(p, workspace_size);
    std::size_t fwd_bytes = 0;
    pl.template carve_forward<T>(nullptr, &fwd_bytes);
    if (status s = detail::validate_buffer(saved, saved_size, pl.saved_bytes()); s != status::success) return s;
    return detail::validate_buffer(workspace, workspace_size, fwd_bytes);
  }

  static detail::split_rows split_rows(const detail::plan& pl, const detail::forward_buffers<T>& fw) {
    return {fw.partials, pl.splits, fw.target_logit};
  }

  // Logit tiles into per-(row, split) partials, the target logits and the filter's tile maxima.
  void tile_pass(const problem<T>& p, const detail::plan& pl, const detail::saved_buffers& sv,
                 const detail::forward_buffers<T>& fw) const {
    if (p.has_lora()) lora_project(p, fw.lora_p);
    const auto label = labels(p);
    const tile::tile_grid& g = pl.grid;
    const dense_inputs x = densify(p);
    std::vector<float> logits(std::size_t(g.bm * g.bn));
    for (std::int64_t rt = 0; rt < g.row_tiles(); ++rt) {
      for (std::int64_t split = 0; split < pl.splits; ++split) {
        const std::int64_t ct_begin = tile::split_begin(g.col_tiles(), pl.splits, split);
        const std::int64_t ct_end = tile::split_begin(g.col_tiles(), pl.splits, split + 1);
        std::vector<row_partial> part(std::size_t(g.bm));
        for (std::int64_t ct = ct_begin; ct < ct_end; ++ct) {
          tile_logits(p, x, own_classes(p, x), fw.lora_p, g, rt, ct, logits);
          float tile_max = -detail::inf_f();
          for (std::int64_t r = 0; r < g.rows_in(rt); ++r) {
            const std::int64_t row = g.row_begin(rt) + r;
            const std::int32_t target = label.column(label(row));
            for (std::int64_t c = 0; c < g.cols_in(ct); ++c) {
              const std::int64_t col = g.col_begin(ct) + c;
              const float z = logits[std::size_t(r * g.bn + c)];
              // The target's logit is kept apart from the softmax statistics (row_output.hpp).
              const bool is_target = target == col;
              if (is_target) fw.target_logit[row] = z;
              part[std::size_t(r)].push(z, shard_class_weight(p, col), std::int32_t(col), !is_target);
              tile_max = detail::max_f(tile_max, z);
            }
          }
          if (pl.filter) sv.tile_max[rt * g.col_tiles() + ct] = tile_max;
        }
        for (std::int64_t r = 0; r < g.rows_in(rt); ++r) {
          fw.partials[(g.row_begin(rt) + r) * pl.splits + split] = part[std::size_t(r)];
        }
      }
    }
  }

  // The filter's split budget (kernel/portable/split_skip.cuh) once the rows are finalised, from tile_pass's
  // partials, whose splits are runs of the grid's tiles.
  void split_skips(const problem<T>& p, const detail::plan& pl, const detail::saved_buffers& sv,
                   const detail::forward_buffers<T>& fw) const {
    if (!pl.filter) return;
    const tile::tile_grid& g = pl.grid;
    const std::int64_t splits = pl.splits;
    const auto label = labels(p);
    const float eps = filter::eps_of<T>(opt_);
    const std::int64_t n_tiles = detail::filter_tiles(g, p.total_classes());
    const auto f = filter::mass_threshold::make(eps, g.bn, n_tiles);
    const auto budget = filter::split_budget::make(eps, g.col_tiles(), n_tiles);
    const auto count = static_cast<std::size_t>(splits);
    std::vector<int> first_rule(count, 0);
    std::vector<float> key(count);
    std::vector<std::int64_t> order(count), rank(count);
    for (std::int64_t rt = 0; rt < g.row_tiles(); ++rt) {
      const std::int64_t r0 = g.row_begin(rt), r1 = r0 + g.rows_in(rt);
      const auto kept = [&](std::int64_t row) { return label(row).kind == detail::row_label::kept; };
      float floor = detail::inf_f();
      for (std::int64_t row = r0; row < r1; ++row)
        if (kept(row)) floor = detail::min_f(floor, sv.lse_others[row]);
      int reserved = 0;
      for (std::int64_t s = 0; s < splits; ++s) {
        const tile::split_span t = tile::split_col_tiles(g, splits, g.bn, s);
        first_rule[std::size_t(s)] = 0;
        for (std::int64_t ct = t.begin; ct < t.end; ++ct)
          first_rule[std::size_t(s)] += f.skip(sv.tile_max[rt * g.col_tiles() + ct] - floor);
        reserved += first_rule[std::size_t(s)];
      }
      const auto cost = [&](std::int64_t row, std::int64_t s) {
        const tile::split_span t = tile::split_col_tiles(g, splits, g.bn, s);
        const std::int32_t col = label.column(label(row));
        const bool target_here = col >= 0 && t.contains(col / g.bn);
        return budget.cost(fw.partials[row * splits + s].softmax.lse(),
                           target_here ? fw.target_logit[row] : -detail::inf_f(), sv.lse_others[row],
                           first_rule[std::size_t(s)]);
      };
      for (std::int64_t s = 0; s < splits; ++s) {
        float m = -detail::inf_f();
        for (std::int64_t row = r0; row < r1; ++row)
          if (kept(row)) m = detail::max_f(m, cost(row, s));
        key[std::size_t(s)] = m == m ? m : detail::inf_f();
        order[std::size_t(s)] = s;
      }
      std::stable_sort(order.begin(), order.end(),
                       [&](std::int64_t a, std::int64_t b) { return key[std::size_t(a)] < key[std::size_t(b)]; });
      for (std::int64_t k = 0; k < splits; ++k) rank[std::size_t(order[std::size_t(k)])] = k;
      std::int64_t prefix = splits > filter::split_budget::max_splits ? 0 : splits;
      for (std::int64_t row = r0; row < r1; ++row) {
        if (!kept(row)) continue;
        float spent = budget.tile_mass * float(reserved);
        std::int64_t k = 0;
        for (; k < prefix && key[std::size_t(order[std::size_t(k)])] < detail::inf_f(); ++k) {
          spent += cost(row, order[std::size_t(k)]);
          if (!budget.admits(spent)) break;
        }
        prefix = k;
      }
      for (std::int64_t s = 0; s < splits; ++s) {
        const tile::split_span t = tile::split_col_tiles(g, splits, g.bn, s);
        for (std::int64_t ct = t.begin; ct < t.end; ++ct)
          sv.split_skip[rt * g.col_tiles() + ct] = rank[std::size_t(s)] < prefix;
      }
    }
  }

  // Finaliser: merge each row's statistics (split_rows or shard_rows), then per-block (loss, weight) sums, then
  // the total.
  template <class Rows>
  void finalise(const problem<T>& p, const detail::plan& pl, const Rows& rows, const forward_outputs& out,
                const detail::saved_buffers& sv, const detail::forward_buffers<T>& fw) const {
    *sv.class_weight_total = class_weight_total(p);
    const loss_terms terms = make_terms(p, *sv.class_weight_total);
    const auto label = labels(p);
    bool invalid = false, inconsistent = false;
    for (std::int64_t b = 0; b < pl.finalise_blocks(); ++b) {
      float loss_sum = 0.f, weight_sum = 0.f;
      for (std::int64_t row = b * pl.finalise_threads; row < std::min(p.n, (b + 1) * pl.finalise_threads); ++row) {
        const detail::row_label lab = label(row);
        const bool kept = lab.kind == detail::row_label::kept;
        row_partial merged;
        float target_logit = 0.f;
        inconsistent |= !rows.read(row, kept ? lab.target : -1, merged, target_logit);
        const row_result r = finalise_row(merged, lab, target_logit, kept ? class_weight(p, lab.target) : 0.f, terms);
        invalid |= lab.kind == detail::row_label::invalid;
        sv.lse[row] = r.lse;
        sv.lse_others[row] = r.lse_others;
        if (out.lse) out.lse[row] = r.lse;
        if (out.entropy) out.entropy[row] = r.entropy;
        if (out.target_logprob) out.target_logprob[row] = r.target_logprob;
        if (out.correct) out.correct[row] = r.correct;
        if (opt_.reduction == reduction::none) out.loss[row] = r.loss;
        loss_sum += r.loss;
        weight_sum += r.weight;
      }
      fw.block_sums[2 * b] = loss_sum;
      fw.block_sums[2 * b + 1] = weight_sum;
    }
    float loss_total = 0.f, weight_total = 0.f;
    for (std::int64_t b = 0; b < pl.finalise_blocks(); ++b) {
      loss_total += fw.block_sums[2 * b];
      weight_total += fw.block_sums[2 * b + 1];
    }
    *sv.weight_sum = weight_total;
    if (opt_.reduction == reduction::sum) *out.loss = loss_total;
    if (opt_.reduction == reduction::mean) *out.loss = loss_total / weight_total;
    if (invalid && out.error) *out.error = int(status::invalid_target);
    if (inconsistent && out.error) *out.error = int(status::invalid_size);
  }

  static float load(const T* base, std::int64_t i) { return detail::to_float(base[i]); }
  template <class G>
  static G store_as(float x) {
    if constexpr (std::is_same_v<G, float>) return x;
    else return detail::from_float<T>(x);
  }
  template <class G>
  static float load_g(const G* base, std::int64_t i) {
    if constexpr (std::is_same_v<G, float>) return base[i];
    else return detail::to_float(base[i]);
  }

  // E and C as dense fp32 rows: the products below read them many times.
  struct dense_inputs {
    std::vector<float> e, c;
  };
  static dense_inputs densify(const problem<T>& p) {
    dense_inputs x;
    x.e.resize(std::size_t(p.n * p.d));
    x.c.resize(std::size_t(p.v * p.d));
    for (std::int64_t i = 0; i < p.n; ++i)
      for (std::int64_t d = 0; d < p.d; ++d) x.e[std::size_t(i * p.d + d)] = load(p.e, i * p.e_stride() + d);
    for (std::int64_t i = 0; i < p.v; ++i)
      for (std::int64_t d = 0; d < p.d; ++d) x.c[std::size_t(i * p.d + d)] = load(p.c, i * p.c_stride() + d);
    return x;
  }

  // Where a vocab chunk's classes [v0, v0 + cols) of the walk are read from and their gradients written to, as
  // in the GPU path (dispatch/portable.cuh): c (dense fp32, D per row), bias, weights and lora_b hold column `base`
  // in their row 0: the problem's own arrays (base 0) or the sorted chunk's gathered copies (base v0), whose
  // gradients go to the classes `classes` names.
  struct vocab_slice {
    std::int64_t v0 = 0, cols = 0, base = 0;
    const float* c = nullptr;
    const T* bias = nullptr;
    const float* weights = nullptr;
    const T* lora_b = nullptr;
    std::int64_t ldb = 0;
    const std::int32_t* classes = nullptr;  // class of walk column v0 + j, null: v0 + j itself

    const float* c_row(std::int64_t col, std::int64_t d) const { return c + (col - base) * d; }
    float weight(std::int64_t col) const { return weights ? weights[col - base] : 1.f; }
    std::int64_t class_of(std::int64_t col) const { return classes ? classes[col - v0] : col; }
    logit_terms<T> terms(logit_terms<T> t) const {
      t.bias = bias;
      t.lora_b = lora_b;
      t.ldb = ldb;
      return t;
    }
  };

  static vocab_slice own_classes(const problem<T>& p, const dense_inputs& x) {
    vocab_slice s;
    s.cols = p.v;
    s.c = x.c.data();
    s.bias = p.bias;
    s.weights = p.class_weights ? p.class_weights + p.shard.offset : nullptr;
    s.lora_b = p.lora.b;
    s.ldb = p.b_stride();
    return s;
  }

  // The sort key of every class (kernel/portable/vocab_sort.cuh: the average logit over the kept rows, without
  // softcap and temperature), the stable descending order, its inverse and the targets as sorted positions.
  // Returns the order (sorted position -> class).
  const std::int32_t* sort_vocabulary(const problem<T>& p, const detail::plan& pl,
                                      const detail::backward_buffers<T>& bw) const {
    const std::int64_t d = p.d, v = p.v, rank = p.lora.rank;
    for (std::int64_t k = 0; k < pl.mean_splits; ++k) {  // column sums per row split, then the kept count
      const std::int64_t r0 = tile::split_begin(p.n, pl.mean_splits, k),
                         r1 = tile::split_begin(p.n, pl.mean_splits, k + 1);
      for (std::int64_t col = 0; col <= d; ++col) {
        float sum = 0.f;
        for (std::int64_t row = r0; row < r1; ++row) {
          if (bw.coef[row].kept) sum += col < d ? load(p.e, row * p.e_stride() + col) : 1.f;
        }
        bw.mean_partial[k * (d + 1) + col] = sum;
      }
    }
    float* e_bar = bw.key_inputs;
    for (std::int64_t col = 0; col <= d; ++col) {
      float sum = 0.f, count = 0.f;
      for (std::int64_t k = 0; k < pl.mean_splits; ++k) {
        sum += bw.mean_partial[k * (d + 1) + col];
        count += bw.mean_partial[k * (d + 1) + d];
      }
      e_bar[col] = col == d ? count : (count > 0.f ? sum / count : 0.f);
    }
    float* lora_u = e_bar + d + 1;
    for (std::int64_t k = 0; k < rank; ++k) {
      float acc = 0.f;
      for (std::int64_t j = 0; j < d; ++j) acc += load(p.lora.a, k * p.a_stride() + j) * e_bar[j];
      lora_u[k] = p.lora.scale * acc;
    }
    float* keys = bw.sort_keys[0];
    std::int32_t* order = bw.sort_values[0];
    for (std::int64_t c = 0; c < v; ++c) {
      float key = 0.f;
      for (std::int64_t j = 0; j < d; ++j) key += load(p.c, c * p.c_stride() + j) * e_bar[j];
      for (std::int64_t k = 0; k < rank; ++k) key += load(p.lora.b, c * p.b_stride() + k) * lora_u[k];
      keys[c] = key + (p.bias ? load(p.bias, c) : 0.f);
      order[c] = std::int32_t(c);
    }
    std::stable_sort(order, order + v, [&](std::int32_t a, std::int32_t b) { return keys[a] > keys[b]; });
    for (std::int64_t i = 0; i < v; ++i) bw.position[order[i]] = std::int32_t(i);
    for (std::int64_t row = 0; row < p.n; ++row) {
      if (bw.coef[row].target >= 0) bw.coef[row].target = bw.position[bw.coef[row].target];
    }
    return order;
  }

  // The sorted walk's chunk s: its classes' rows gathered into the chunk buffers (and C's in fp32 into `dense`).
  void gather(const problem<T>& p, const detail::pass_buffers<T>& pb, const std::int32_t* order, vocab_slice& s,
              std::vector<float>& dense) const {
    const std::int64_t d = p.d, rank = p.lora.rank;
    const float* weights = s.weights;
    dense.resize(std::size_t(s.cols * d));
    for (std::int64_t j = 0; j < s.cols; ++j) {
      const std::int64_t cls = order[s.v0 + j];
      for (std::int64_t k = 0; k < d; ++k) {
        pb.c_sorted[j * d + k] = p.c[cls * p.c_stride() + k];
        dense[std::size_t(j * d + k)] = load(pb.c_sorted, j * d + k);
      }
      for (std::int64_t k = 0; k < rank; ++k) pb.b_sorted[j * rank + k] = p.lora.b[cls * p.b_stride() + k];
      if (p.bias) pb.bias_sorted[j] = p.bias[cls];
      if (weights) pb.weights_sorted[j] = weights[cls];
    }
    s.base = s.v0;
    s.c = dense.data();
    s.bias = p.bias ? pb.bias_sorted : nullptr;
    s.weights = weights ? pb.weights_sorted : nullptr;
    s.lora_b = pb.b_sorted;
    s.ldb = rank;
    s.classes = order + s.v0;
  }

  detail::target_reader labels(const problem<T>& p) const { return detail::make_target_reader(p, opt_); }
  // w of a global class id, and of a column of the problem's (possibly sharded) classes.
  static float class_weight(const problem<T>& p, std::int64_t cls) {
    return p.class_weights ? p.class_weights[cls] : 1.f;
  }
  static float shard_class_weight(const problem<T>& p, std::int64_t col) {
    return class_weight(p, p.shard.offset + col);
  }
  static float class_weight_total(const problem<T>& p) {
    if (!p.class_weights) return float(p.total_classes());
    float w = 0.f;
    for (std::int64_t v = 0; v < p.total_classes(); ++v) w += p.class_weights[v];
    return w;
  }
  loss_terms make_terms(const problem<T>& p, float weight_total) const {
    return {opt_.label_smoothing, opt_.z_loss, 1.f / float(p.total_classes()), weight_total};
  }
  logit_transform transform() const { return {opt_.softcap, 1.f / opt_.temperature}; }

  // lora_p = scale * E A^T (N x r, fp32).
  static void lora_project(const problem<T>& p, float* lora_p) {
    for (std::int64_t i = 0; i < p.n; ++i)
      for (std::int64_t k = 0; k < p.lora.rank; ++k) {
        float acc = 0.f;
        for (std::int64_t d = 0; d < p.d; ++d) acc += load(p.e, i * p.e_stride() + d) * load(p.lora.a, k * p.a_stride() + d);
        lora_p[i * p.lora.rank + k] = p.lora.scale * acc;
      }
  }

  // z of one bm x bn tile: the per-logit terms (bias, low-rank head, softcap, temperature) on E C^T.
  void tile_logits(const problem<T>& p, const dense_inputs& x, const vocab_slice& s, const float* lora_p,
                   const tile::tile_grid& g, std::int64_t rt, std::int64_t ct, std::vector<float>& z) const {
    const logit_terms<T> terms = s.terms(make_logit_terms(p, opt_, lora_p));
    for (std::int64_t r = 0; r < g.rows_in(rt); ++r) {
      const std::int64_t row = g.row_begin(rt) + r;
      const float* er = &x.e[std::size_t(row * p.d)];
      for (std::int64_t c = 0; c < g.cols_in(ct); ++c) {
        const std::int64_t col = g.col_begin(ct) + c;
        const float* cr = s.c_row(col, p.d);
        float acc = 0.f;
        for (std::int64_t d = 0; d < p.d; ++d) acc += er[d] * cr[d];
        z[std::size_t(r * g.bn + c)] = terms(acc, row, col - s.base);
      }
    }
  }

  // The near-uniform rows' baseline (row_loss.hpp, as kernel/portable/uniform_baseline.cuh computes it): the rows
  // whose row tile's largest tile max passes filter::near_uniform with their lse, their baseline on the
  // draw's scale (0 for the other rows), the column sums of C and, for all rows, of row_scale[i] e_i and row_scale;
  // with plan::linear, first the rows near-uniform to first order, and the rows that take a baseline leave their
  // one-hot term to after the walk, and so do the lone targets. Says which updates follow the walk: the share's
  // products when a row took a baseline (the GPU's state[0]), the one-hot terms then or with lone targets (state[4]).
  struct onehots_after_walk {
    bool share = false, lone = false;
  };
  onehots_after_walk take_baselines(const problem<T>& p, const dense_inputs& x, const detail::plan& pl,
                                    const detail::saved_buffers& sv, const detail::uniform_baseline_buffers& b,
                                    detail::row_coefficients* coef) const {
    const tile::tile_grid& g = pl.grid;
    const auto uniform = filter::near_uniform_of<T>(opt_, p.total_classes());
    const auto linear = filter::near_uniform_linear_of<T>(opt_, p.v);
    bool plausible = false;  // some row may be near-uniform to first order
    for (std::int64_t rt = 0; rt < g.row_tiles(); ++rt) {
      float m = -detail::inf_f();
      for (std::int64_t ct = 0; ct < g.col_tiles(); ++ct) m = detail::max_f(m, sv.tile_max[rt * g.col_tiles() + ct]);
      for (std::int64_t row = g.row_begin(rt); row < g.row_begin(rt) + g.rows_in(rt); ++row) {
        detail::row_coefficients& rc = coef[row];
        if (rc.kept && uniform.holds(m, rc.lse))
          rc.dz.baseline = (rc.dz.ce + rc.dz.extra) * (1.f / float(p.total_classes()));
        plausible = plausible || (rc.kept && linear.plausible(m, rc.lse));
        b.row_scale[row] = rc.dz.baseline / opt_.temperature;
      }
    }
    for (std::int64_t d = 0; d < p.d; ++d) {
      float classes = 0.f;
      for (std::int64_t c = 0; c < p.v; ++c) classes += x.c[std::size_t(c * p.d + d)];
      b.class_sum[d] = classes;
    }
    if (pl.linear()) take_linear_baselines(p, x, linear, plausible, b, coef);
    bool apart = false;  // rows that take a baseline and leave their one-hot term to after the walk (plan::linear)
    for (std::int64_t row = 0; pl.linear_rows && row < p.n; ++row) {
      detail::row_coefficients& rc = coef[row];
      const bool take = pl.linear() && rc.kept && rc.dz.baseline != 0.f;
      b.target_scale[row] = take ? rc.dz.ce / opt_.temperature : 0.f;
      b.target_class[row] = take ? rc.target : -1;
      if (take) rc.target = -1;
      apart = apart || take;
    }
    const bool lone = pl.linear_rows && take_lone_targets(p, x, pl, sv, b, coef);
    for (std::int64_t d = 0; d <= p.d; ++d) {
      float rows = 0.f;
      for (std::int64_t row = 0; row < p.n; ++row)
        rows += b.row_scale[row] * (d < p.d ? x.e[std::size_t(row * p.d + d)] : 1.f);
      b.row_sums[d] = rows;
    }
    return {apart, lone};
  }

  // The lone targets (as kernel/portable/lone_targets.cuh): rows whose target tile the filter skips but for the
  // target leave -ce target_residual dz/draw(z_y) to the updates after the walk. Returns whether there are any.
  bool take_lone_targets(const problem<T>& p, const dense_inputs& x, const detail::plan& pl,
                         const detail::saved_buffers& sv, const detail::uniform_baseline_buffers& b,
                         detail::row_coefficients* coef) const {
    const tile::tile_grid& g = pl.grid;
    const auto f =
        filter::mass_threshold::make(filter::eps_of<T>(opt_), g.bn, detail::filter_tiles(g, p.total_classes()));
    const logit_transform tf = transform();
    bool any = false;
    for (std::int64_t rt = 0; rt < g.row_tiles(); ++rt) {
      float min_floor = detail::inf_f();
      for (std::int64_t row = g.row_begin(rt); row < g.row_begin(rt) + g.rows_in(rt); ++row)
        if (coef[row].kept) min_floor = detail::min_f(min_floor, coef[row].lse_others);
      for (std::int64_t row = g.row_begin(rt); row < g.row_begin(rt) + g.rows_in(rt); ++row) {
        detail::row_coefficients& rc = coef[row];
        if (!rc.kept || rc.target < 0 || rc.dz.baseline != 0.f) continue;
        const std::int64_t tile = rt * g.col_tiles() + rc.target / g.bn;
        // The maximum, or the split budget with the target's own mass (lone_targets.cuh).
        if (!f.skip(sv.tile_max[tile] - min_floor, sv.split_skip[tile] != 0)) continue;
        float raw = 0.f;
        for (std::int64_t k = 0; k < p.d; ++k)
          raw += x.e[std::size_t(row * p.d + k)] * x.c[std::size_t(rc.target * p.d + k)];
        const float derivative = tf.derivative(raw);
        b.target_scale[row] = -rc.dz.ce * rc.dz.target_residual * derivative;
        b.target_class[row] = rc.target;
        rc.target = -1;
        any = true;
      }
    }
    return any;
  }

  // The one-hot terms left to after the walk (uniform_baseline.cuh's onehot_rows_kernel and onehot_classes_kernel),
  // once the share's products are done: dE row i -= t_i c_y and dC row y -= the sum over its rows of t_i e_i, in row
  // order, each added to the gradient as written.
  template <class G>
  void add_onehots(const problem<T>& p, const dense_inputs& x, const detail::uniform_baseline_buffers& b,
                   const gradients<G>& out) const {
    const std::int64_t n = p.n, dd = p.d;
    if (out.de) {
      const std::int64_t ld = out.ld_de ? out.ld_de : dd;
      for (std::int64_t row = 0; row < n; ++row)
        for (std::int64_t j = 0; b.target_scale[row] != 0.f && j < dd; ++j)
          out.de[row * ld + j] = store_as<G>(load_g(out.de, row * ld + j) +
                                             -b.target_scale[row] * x.c[std::size_t(b.target_class[row] * dd + j)]);
    }
    if (!out.dc) return;
    const std::int64_t ld = out.ld_dc ? out.ld_dc : dd;
    std::vector<float> sum(std::size_t(p.v * dd), 0.f);  // per class, over its rows in row order
    std::vector<bool> has_rows(std::size_t(p.v), false);  // the classes the GPU's kernel writes
    for (std::int64_t row = 0; row < n; ++row) {
      if (b.target_scale[row] == 0.f) continue;
      has_rows[std::size_t(b.target_class[row])] = true;
      for (std::int64_t j = 0; j < dd; ++j)
        sum[std::size_t(b.target_class[row] * dd + j)] -= b.target_scale[row] * x.e[std::size_t(row * dd + j)];
    }
    for (std::int64_t c = 0; c < p.v; ++c)
      for (std::int64_t j = 0; has_rows[std::size_t(c)] && j < dd; ++j)
        out.dc[c * ld + j] = store_as<G>(load_g(out.dc, c * ld + j) + sum[std::size_t(c * dd + j)]);
  }

  // The first-order test (as kernel/portable/uniform_baseline.cuh's class_norm_kernel and linear_rows_kernel), run
  // when some kept row is `plausible`.
  void take_linear_baselines(const problem<T>& p, const dense_inputs& x, const filter::near_uniform_linear& test,
                             bool plausible, const detail::uniform_baseline_buffers& b,
                             detail::row_coefficients* coef) const {
    const float inv_classes = 1.f / float(p.v), s = 1.f / opt_.temperature;
    std::fill(b.linear_scale, b.linear_scale + p.n, 0.f);
    for (std::int64_t d = 0; d < p.d; ++d) b.class_mean[d] = -b.class_sum[d] * inv_classes;
    float class_norm2 = 0.f;  // with a softcap: the largest squared norm of C's rows
    for (std::int64_t c = 0; plausible && opt_.softcap > 0.f && c < p.v; ++c) {
      float ss = 0.f;
      for (std::int64_t d = 0; d < p.d; ++d) ss += x.c[std::size_t(c * p.d + d)] * x.c[std::size_t(c * p.d + d)];
      class_norm2 = detail::max_f(class_norm2, ss);
    }
    for (std::int64_t row = 0; plausible && row < p.n; ++row) {
      detail::row_coefficients& rc = coef[row];
      float dot = 0.f, ss = 0.f;
      for (std::int64_t d = 0; d < p.d; ++d) {
        const float e = x.e[std::size_t(row * p.d + d)];
        dot += e * b.class_sum[d];
        ss += e * e;
      }
      const float zbar = dot * inv_classes * s, bound = detail::sqrt_f(ss * class_norm2) * s;
      if (!rc.kept || !test.holds(zbar, rc.lse, bound)) continue;
      rc.dz.baseline = (rc.dz.ce + rc.dz.extra) * inv_classes * detail::exp_f(test.log_kappa(zbar, rc.lse));
      rc.dz.slope = rc.dz.baseline * s;
      rc.dz.mean_logit = zbar;
      b.row_scale[row] = rc.dz.slope;
      b.linear_scale[row] = rc.dz.slope * s;
    }
  }

  // The first-order baseline's share, once the walk is done (dispatch/portable.cuh, share_products): with
  // l = linear_scale and s = class_sum, dE += diag(l) E G, G = C^T C - s s^T / V, and dC += C H - (s / V) H,
  // H = E^T (diag(l) E), the matrices and the scaled rows rounded to T as the GPU stores them, each formed on and
  // above its diagonal and mirrored.
  template <class G>
  void add_linear_baselines(const problem<T>& p, const dense_inputs& x, const detail::uniform_baseline_buffers& b,
                            const gradients<G>& out) const {
    const std::int64_t n = p.n, dd = p.d, v = p.v;
    const auto rounded = [](float y) { return detail::to_float(detail::from_float<T>(y)); };
    std::vector<float> m(std::size_t(dd * dd));
    if (out.de) {
      for (std::int64_t i = 0; i < dd; ++i)
        for (std::int64_t j = i; j < dd; ++j) {
          float acc = 0.f;
          for (std::int64_t c = 0; c < v; ++c) acc += x.c[std::size_t(c * dd + i)] * x.c[std::size_t(c * dd + j)];
          m[std::size_t(i * dd + j)] = m[std::size_t(j * dd + i)] = rounded(acc + b.class_sum[i] * b.class_mean[j]);
        }
      const std::int64_t ld = out.ld_de ? out.ld_de : dd;
      for (std::int64_t row = 0; row < n; ++row)
        for (std::int64_t j = 0; j < dd; ++j) {
          float acc = 0.f;
          for (std::int64_t k = 0; k < dd; ++k) acc += x.e[std::size_t(row * dd + k)] * m[std::size_t(k * dd + j)];
          out.de[row * ld + j] = store_as<G>(load_g(out.de, row * ld + j) + b.linear_scale[row] * acc);
        }
    }
    if (!out.dc) return;
    std::vector<float> scaled(std::size_t(n * dd));
    for (std::int64_t row = 0; row < n; ++row)
      for (std::int64_t k = 0; k < dd; ++k)
        scaled[std::size_t(row * dd + k)] = rounded(b.linear_scale[row] * x.e[std::size_t(row * dd + k)]);
    for (std::int64_t i = 0; i < dd; ++i)
      for (std::int64_t j = i; j < dd; ++j) {  // the upper triangle, mirrored
        float acc = 0.f;
        for (std::int64_t row = 0; row < n; ++row)
          acc += x.e[std::size_t(row * dd + i)] * scaled[std::size_t(row * dd + j)];
        m[std::size_t(i * dd + j)] = m[std::size_t(j * dd + i)] = rounded(acc);
      }
    std::vector<float> term(std::size_t(dd), 0.f);
    for (std::int64_t k = 0; k < dd; ++k)
      for (std::int64_t j = 0; j < dd; ++j) term[std::size_t(j)] += b.class_mean[k] * m[std::size_t(k * dd + j)];
    const std::int64_t ld = out.ld_dc ? out.ld_dc : dd;
    for (std::int64_t c = 0; c < v; ++c)
      for (std::int64_t j = 0; j < dd; ++j) {
        float acc = 0.f;
        for (std::int64_t k = 0; k < dd; ++k) acc += x.c[std::size_t(c * dd + k)] * m[std::size_t(k * dd + j)];
        out.dc[c * ld + j] = store_as<G>(load_g(out.dc, c * ld + j) + (acc + term[std::size_t(j)]));
      }
  }

  // May tile (rt, ct) be skipped? Only rows that contribute count; target tiles and smoothing are never skipped.
  // The unsorted walk decides from the forward's tile max before computing anything; the sorted walk computes the
  // tile into `z` first (`computed`) and applies the same predicate to its max logit over the kept rows.
  bool tile_active(const problem<T>& p, const dense_inputs& x, const vocab_slice& s, const detail::plan& pl,
                   const detail::saved_buffers& sv, const detail::backward_buffers<T>& bw, std::int64_t rt,
                   std::int64_t ct, std::vector<float>& z, bool& computed) const {
    const tile::tile_grid& g = pl.grid;
    float min_floor = detail::inf_f();
    bool any = false, near_uniform = true;
    for (std::int64_t r = 0; r < g.rows_in(rt); ++r) {
      const detail::row_coefficients& rc = bw.coef[g.row_begin(rt) + r];
      if (!rc.kept) continue;
      any = true;
      if (rc.target >= g.col_begin(ct) && rc.target < g.col_begin(ct) + g.cols_in(ct)) return true;
      min_floor = detail::min_f(min_floor, rc.lse_others);
      near_uniform = near_uniform && rc.dz.baseline != 0.f;
    }
    if (!any) return false;
    if (!pl.filter || opt_.label_smoothing != 0.f) return true;
    if (near_uniform) return false;  // only the rows' deviations from their baseline
    const auto f =
        filter::mass_threshold::make(filter::eps_of<T>(opt_), g.bn, detail::filter_tiles(g, p.total_classes()));
    const std::int64_t tile = rt * g.col_tiles() + ct;
    if (!pl.sort) return !f.skip(sv.tile_max[tile] - min_floor, sv.split_skip[tile] != 0);
    tile_logits(p, x, s, bw.lora_p, g, rt, ct, z);
    computed = true;
    float m = -detail::inf_f();
    for (std::int64_t r = 0; r < g.rows_in(rt); ++r) {
      if (!bw.coef[g.row_begin(rt) + r].kept) continue;
      for (std::int64_t c = 0; c < g.cols_in(ct); ++c) m = detail::max_f(m, z[std::size_t(r * g.bn + c)]);
    }
    return !f.skip(m - min_floor);
  }

  // dZ for rows [r0, r0 + rows) and the slice's classes: draw in T, dbias partials per row tile; the tiles
  // computed and skipped are added to `counts` when given.
  void compute_dz(const problem<T>& p, const dense_inputs& x, const vocab_slice& s, const detail::plan& pl,
                  const detail::saved_buffers& sv, const detail::backward_buffers<T>& bw,
                  const detail::pass_buffers<T>& pb, std::int64_t r0, std::int64_t rows, std::int64_t* counts) const {
    const std::int64_t v0 = s.v0, cols = s.cols;
    const tile::tile_grid& g = pl.grid;
    const logit_transform tf = transform();
    std::vector<float> z(std::size_t(g.bm * g.bn));
    const std::int64_t ldz = pb.shape.cols, chunk_tiles = ldz / g.bn;
    for (std::int64_t rt = r0 / g.bm; rt < detail::ceil_div(r0 + rows, g.bm); ++rt) {
      for (std::int64_t ct = v0 / g.bn; ct < detail::ceil_div(v0 + cols, g.bn); ++ct) {
        bool computed = false;
        const bool significant = tile_active(p, x, s, pl, sv, bw, rt, ct, z, computed);
        // With one gradient filtered, every tile with gradient is computed and the filter's decision kept apart.
        const bool active = pl.split_filter ? carries_gradient(bw, g, rt) : significant;
        const std::int64_t flag = (rt - r0 / g.bm) * chunk_tiles + (ct - v0 / g.bn);
        pb.active[flag] = active;
        if (pb.significant) pb.significant[flag] = significant;
        if (counts) ++counts[significant ? 0 : 1];
        std::vector<float> col_sum(std::size_t(g.bn), 0.f);
        if (active) {
          if (!computed) tile_logits(p, x, s, bw.lora_p, g, rt, ct, z);
          for (std::int64_t r = 0; r < g.rows_in(rt); ++r) {
            const std::int64_t row = g.row_begin(rt) + r;
            const detail::row_coefficients& rc = bw.coef[row];
            for (std::int64_t c = 0; c < g.cols_in(ct); ++c) {
              const std::int64_t col = g.col_begin(ct) + c;
              const float zz = z[std::size_t(r * g.bn + c)];
              const float prob = detail::exp_f(zz - rc.lse);
              const float draw = rc.dz.draw(prob, col == rc.target, s.weight(col), tf.derivative_from_logit(zz),
                                            tf.inv_temperature, zz);
              pb.dz[(row - r0) * ldz + (col - v0)] = detail::from_float<T>(draw);
              col_sum[std::size_t(c)] += draw;
            }
          }
        }
        if (pb.dbias_partial) {  // the passes that write dBias
          for (std::int64_t c = 0; c < g.cols_in(ct); ++c) {
            pb.dbias_partial[rt * ldz + (g.col_begin(ct) - v0) + c] = col_sum[std::size_t(c)];
          }
        }
      }
    }
  }

  static bool carries_gradient(const detail::backward_buffers<T>& bw, const tile::tile_grid& g, std::int64_t rt) {
    for (std::int64_t r = 0; r < g.rows_in(rt); ++r)
      if (bw.coef[g.row_begin(rt) + r].kept) return true;
    return false;
  }

  // dZ as a product reads it: the tiles computed, or with one gradient filtered, those the filter keeps for that
  // gradient's product (`filtered`).
  float dz_at(const detail::plan& pl, const detail::pass_buffers<T>& pb, std::int64_t r0, std::int64_t row,
              std::int64_t v0, std::int64_t col, bool filtered = false) const {
    const std::uint8_t* flags = filtered && pb.significant ? pb.significant : pb.active;
    const std::int64_t chunk_tiles = pb.shape.cols / pl.grid.bn;
    const bool live = flags[(row / pl.grid.bm - r0 / pl.grid.bm) * chunk_tiles + (col - v0) / pl.grid.bn] != 0;
    return live ? load(pb.dz, (row - r0) * pb.shape.cols + (col - v0)) : 0.f;
  }

  // acc (fp32, optionally compensated) += x; on the last contribution, out = (accumulate ? out : 0) + acc.
  template <class G>
  void accumulate_out(float x, float* acc, float* comp, std::int64_t ai, G* out, std::int64_t oi, bool first,
                      bool last) const {
    float total = x;
    if (acc) {
      kahan_sum k{first ? 0.f : acc[ai], (first || !comp) ? 0.f : comp[ai]};
      if (comp) k.add(x);
      else k.sum += x;
      total = k.value();
      if (!last) {
        acc[ai] = k.sum;
        if (comp) comp[ai] = k.compensation;
        return;
      }
    }
    out[oi] = store_as<G>((opt_.accumulate ? load_g(out, oi) : 0.f) + total);
  }

  // dE[rows] (+)= dZ C_chunk (+ scale * lora_q A on the last chunk).
  template <class G>
  void de_update(const problem<T>& p, const vocab_slice& s, const detail::plan& pl,
                 const detail::backward_buffers<T>& bw, const detail::pass_buffers<T>& pb, const gradients<G>& out,
                 std::int64_t ld, std::int64_t r0, std::int64_t rows, bool first, bool last) const {
    const std::int64_t v0 = s.v0, cols = s.cols;
    std::vector<float> acc(std::size_t(p.d));
    for (std::int64_t row = r0; row < r0 + rows; ++row) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (std::int64_t col = v0; col < v0 + cols; ++col) {
        const float dz = dz_at(pl, pb, r0, row, v0, col, opt_.filter_de);
        const float* cr = s.c_row(col, p.d);
        for (std::int64_t d = 0; d < p.d; ++d) acc[std::size_t(d)] += dz * cr[d];
      }
      for (std::int64_t d = 0; d < p.d; ++d) {
        float a = acc[std::size_t(d)];
        if (last && p.has_lora()) {
          float l = 0.f;
          for (std::int64_t k = 0; k < p.lora.rank; ++k) l += bw.lora_q[row * p.lora.rank + k] * load(p.lora.a, k * p.a_stride() + d);
          a += p.lora.scale * l;
        }
        if (last && bw.baseline.row_scale) a += bw.baseline.row_scale[row] * bw.baseline.class_sum[d];
        accumulate_out(a, pb.acc, pb.comp, (row - r0) * p.d + d, out.de,
                       row * ld + d, first, last);
      }
    }
  }

  // dC of the slice's classes (+)= dZ^T E[rows] (+ the baseline's share on the last row block).
  template <class G>
  void dc_update(const problem<T>& p, const dense_inputs& x, const vocab_slice& s, const detail::plan& pl,
                 const detail::backward_buffers<T>& bw, const detail::pass_buffers<T>& pb, const gradients<G>& out,
                 std::int64_t ld, std::int64_t r0, std::int64_t rows, bool first, bool last) const {
    const std::int64_t v0 = s.v0, cols = s.cols;
    std::vector<float> acc(std::size_t(p.d));
    for (std::int64_t col = v0; col < v0 + cols; ++col) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (std::int64_t row = r0; row < r0 + rows; ++row) {
        const float dz = dz_at(pl, pb, r0, row, v0, col, opt_.filter_dc);
        const float* er = &x.e[std::size_t(row * p.d)];
        for (std::int64_t d = 0; d < p.d; ++d) acc[std::size_t(d)] += dz * er[d];
      }
      for (std::int64_t d = 0; d < p.d; ++d) {
        if (last && bw.baseline.row_scale) acc[std::size_t(d)] += bw.baseline.row_sums[d];
        accumulate_out(acc[std::size_t(d)], first && last ? nullptr : pb.acc, pb.comp, (col - v0) * p.d + d, out.dc,
                       s.class_of(col) * ld + d, first, last);
      }
    }
  }

  // dBias_chunk = sum over all row tiles of the dZ kernel's column partials, in row-tile order.
  template <class G>
  void dbias_update(const vocab_slice& s, const detail::plan& pl, const detail::backward_buffers<T>& bw,
                    const detail::pass_buffers<T>& pb, const gradients<G>& out) const {
    for (std::int64_t c = 0; c < s.cols; ++c) {
      float sum = bw.baseline.row_scale ? bw.baseline.row_sums[pl.d] : 0.f;
      for (std::int64_t rt = 0; rt < pl.grid.row_tiles(); ++rt) sum += pb.dbias_partial[rt * pb.shape.cols + c];
      const std::int64_t o = s.class_of(s.v0 + c);
      out.dbias[o] = store_as<G>((opt_.accumulate ? load_g(out.dbias, o) : 0.f) + sum);
    }
  }

  // lora_q[rows] += dZ B_chunk.
  void lora_accumulate_q(const problem<T>& p, const vocab_slice& s, const detail::plan& pl,
                         const detail::backward_buffers<T>& bw, const detail::pass_buffers<T>& pb, std::int64_t r0,
                         std::int64_t rows) const {
    const std::int64_t v0 = s.v0, cols = s.cols;
    for (std::int64_t row = r0; row < r0 + rows; ++row)
      for (std::int64_t k = 0; k < p.lora.rank; ++k) {
        float acc = 0.f;
        for (std::int64_t col = v0; col < v0 + cols; ++col)
          acc += dz_at(pl, pb, r0, row, v0, col) * load(s.lora_b, (col - s.base) * s.ldb + k);
        bw.lora_q[row * p.lora.rank + k] += acc;
      }
  }

  // dB_chunk (+)= dZ^T lora_p[rows].
  template <class G>
  void db_update(const problem<T>& p, const vocab_slice& s, const detail::plan& pl,
                 const detail::backward_buffers<T>& bw, const detail::pass_buffers<T>& pb, const gradients<G>& out,
                 std::int64_t r0, std::int64_t rows, bool first, bool last) const {
    const std::int64_t v0 = s.v0, cols = s.cols;
    for (std::int64_t col = v0; col < v0 + cols; ++col)
      for (std::int64_t k = 0; k < p.lora.rank; ++k) {
        float acc = 0.f;
        for (std::int64_t row = r0; row < r0 + rows; ++row)
          acc += dz_at(pl, pb, r0, row, v0, col) * bw.lora_p[row * p.lora.rank + k];
        accumulate_out(acc, pb.db_acc, nullptr, (col - v0) * p.lora.rank + k, out.db, s.class_of(col) * p.lora.rank + k,
                       first, last);
      }
  }

  // dA = scale * lora_q^T E.
  template <class G>
  void da_update(const problem<T>& p, const detail::backward_buffers<T>& bw, const gradients<G>& out) const {
    for (std::int64_t k = 0; k < p.lora.rank; ++k)
      for (std::int64_t d = 0; d < p.d; ++d) {
        float acc = 0.f;
        for (std::int64_t row = 0; row < p.n; ++row) acc += bw.lora_q[row * p.lora.rank + k] * load(p.e, row * p.e_stride() + d);
        out.da[k * p.d + d] = store_as<G>((opt_.accumulate ? load_g(out.da, k * p.d + d) : 0.f) + p.lora.scale * acc);
      }
  }
};

}  // namespace cce::host
