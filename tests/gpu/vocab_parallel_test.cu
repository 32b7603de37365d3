// Vocabulary parallelism on one GPU: R shards run in sequence (shard_forward into their slot of one gathered
// buffer, combine, backward) and are compared with the single call on the whole vocabulary and with the float64
// reference. dE and dA are summed over the shards in fp32; dC, dBias and dB land in their slices.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <numeric>
#include <random>
#include <vector>

#include <cce/cce.cuh>
#include "../common/case_check.hpp"
#include "../common/device_problem.hpp"
#include "../common/launch.hpp"
#include "../common/vocab_shards.hpp"

namespace {

using namespace cce;
using test::device_problem;
using test::device_vector;

// Forward outputs poisoned with NaN (0xff bytes): anything left unwritten fails the comparison.
struct device_outputs {
  device_vector<float> loss, lse, entropy, logprob;
  device_vector<std::uint8_t> correct;
  device_vector<int> error{1};
  forward_outputs out;
  device_outputs(std::size_t n, bool per_row_loss)
      : loss(per_row_loss ? n : 1), lse(n), entropy(n), logprob(n), correct(n) {
    REQUIRE_CUDA(cudaMemset(loss.ptr, 0xff, loss.count * 4));
    for (auto* v : {&lse, &entropy, &logprob}) REQUIRE_CUDA(cudaMemset(v->ptr, 0xff, n * 4));
    REQUIRE_CUDA(cudaMemset(correct.ptr, 0xff, n));
    REQUIRE_CUDA(cudaMemset(error.ptr, 0, 4));
    out = {loss.ptr, lse.ptr, entropy.ptr, logprob.ptr, correct.ptr, error.ptr};
  }
  void download(test::case_results& r) const {
    REQUIRE_CUDA(cudaDeviceSynchronize());
    r.loss = loss.download();
    r.lse = lse.download();
    r.entropy = entropy.download();
    r.target_logprob = logprob.download();
    r.correct = correct.download();
    r.error = error.download()[0];
  }
};

// Float gradients of the whole vocabulary, poisoned (or prefilled with options::accumulate).
struct device_gradients {
  device_vector<float> de, dc, dbias, da, db;
  device_gradients(const test::case_config& cfg)
      : de(fill(std::size_t(cfg.n * cfg.d), cfg, 1)), dc(fill(std::size_t(cfg.v * cfg.d), cfg, 2)),
        dbias(fill(cfg.bias ? std::size_t(cfg.v) : 0, cfg, 3)), da(fill(std::size_t(cfg.rank * cfg.d), cfg, 4)),
        db(fill(std::size_t(cfg.v * cfg.rank), cfg, 5)) {}
  static std::vector<float> fill(std::size_t count, const test::case_config& cfg, std::uint64_t salt) {
    return cfg.opts.accumulate ? test::make_prefill(count, cfg.seed + salt) : std::vector<float>(count, NAN);
  }
};

template <class T>
test::case_results run_whole(const test::host_problem<T>& h, std::size_t budget) {
  const test::case_config& cfg = h.cfg;
  const linear_cross_entropy<T> op{cfg.opts};
  device_problem<T> dp(h);
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  const std::size_t saved_bytes = op.saved_bytes(dp.p), ws_bytes = op.workspace_bytes(dp.p, dev, budget);
  device_vector<unsigned char> saved(saved_bytes), ws(ws_bytes);
  device_outputs o(std::size_t(cfg.n), cfg.opts.reduction == reduction::none);
  REQUIRE(test::forward(op, dp.p, o.out, saved.ptr, saved_bytes, ws.ptr, ws_bytes) == status::success);
  device_vector<float> grad(test::make_grad_loss(cfg));
  device_gradients g(cfg);
  gradients<float> grads{g.de.ptr, g.dc.ptr, g.dbias.ptr, g.da.ptr, g.db.ptr};
  REQUIRE(test::backward(op, dp.p, loss_gradient{grad.ptr}, grads, saved.ptr, saved_bytes, ws.ptr, ws_bytes) ==
          status::success);
  test::case_results r;
  o.download(r);
  r.de = g.de.download();
  r.dc = g.dc.download();
  r.dbias = g.dbias.download();
  r.da = g.da.download();
  r.db = g.db.download();
  return r;
}

struct sharded_results {
  std::vector<test::case_results> per_rank;  // forward outputs of every rank
  test::case_results total;                  // rank 0's outputs and the assembled gradients
};

// The shards run one after the other; `gather` is the order of their slots in the gathered buffer.
template <class T>
sharded_results run_sharded(const test::host_problem<T>& h, const std::vector<std::int64_t>& offsets,
                            const std::vector<int>& gather, std::size_t budget) {
  const test::case_config& cfg = h.cfg;
  const linear_cross_entropy<T> op{cfg.opts};
  device_problem<T> dp(h);
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  const int ranks = int(offsets.size());
  std::vector<problem<T>> shard;
  for (int r = 0; r < ranks; ++r) {
    shard.push_back(test::shard_of(dp.p, offsets[std::size_t(r)], test::shard_size(offsets, std::size_t(r), cfg.v)));
  }
  const std::size_t stats_bytes = op.shard_stats_bytes(shard[0]);
  device_vector<unsigned char> gathered(stats_bytes * std::size_t(ranks));
  std::deque<device_vector<unsigned char>> saved, ws;  // a deque never moves its elements
  std::vector<std::size_t> saved_bytes, ws_bytes;
  for (int r = 0; r < ranks; ++r) {
    saved_bytes.push_back(op.saved_bytes(shard[std::size_t(r)]));
    ws_bytes.push_back(op.workspace_bytes(shard[std::size_t(r)], dev, budget));
    saved.emplace_back(saved_bytes.back());
    ws.emplace_back(ws_bytes.back());
  }
  std::vector<std::int64_t> gathered_offsets;
  for (std::size_t slot = 0; slot < gather.size(); ++slot) {  // each rank writes its slot, as an in-place all-gather
    const std::size_t r = std::size_t(gather[slot]);
    REQUIRE(test::shard_forward(op, shard[r], gathered.ptr + slot * stats_bytes, stats_bytes, saved[r].ptr, saved_bytes[r],
                             ws[r].ptr, ws_bytes[r]) == status::success);
    gathered_offsets.push_back(offsets[r]);
  }
  const gathered_stats all{gathered.ptr, gathered.count, gathered_offsets.data(), ranks};

  sharded_results res;
  device_vector<float> grad(test::make_grad_loss(cfg));
  device_gradients g(cfg);
  std::vector<float> de_sum(g.de.count, 0.f), da_sum(g.da.count, 0.f);
  for (int r = 0; r < ranks; ++r) {
    const std::size_t k = std::size_t(r);
    const problem<T>& p = shard[k];
    device_outputs o(std::size_t(cfg.n), cfg.opts.reduction == reduction::none);
    REQUIRE(test::combine(op, p, all, o.out, saved[k].ptr, saved_bytes[k], ws[k].ptr, ws_bytes[k]) == status::success);
    test::case_results rr;
    o.download(rr);
    res.per_rank.push_back(rr);
    // With accumulate, rank 0 adds the partial sums to the existing dE and dA and the others start from 0.
    device_vector<float> de(r == 0 ? device_gradients::fill(g.de.count, cfg, 1) : std::vector<float>(g.de.count, 0.f));
    device_vector<float> da(r == 0 ? device_gradients::fill(g.da.count, cfg, 4) : std::vector<float>(g.da.count, 0.f));
    gradients<float> grads;
    grads.de = de.ptr;
    grads.dc = g.dc.ptr + p.shard.offset * cfg.d;
    grads.dbias = cfg.bias ? g.dbias.ptr + p.shard.offset : nullptr;
    grads.da = cfg.rank ? da.ptr : nullptr;
    grads.db = cfg.rank ? g.db.ptr + p.shard.offset * cfg.rank : nullptr;
    REQUIRE(test::backward(op, p, loss_gradient{grad.ptr}, grads, saved[k].ptr, saved_bytes[k], ws[k].ptr, ws_bytes[k]) ==
            status::success);
    const std::vector<float> de_h = de.download(), da_h = da.download();
    for (std::size_t i = 0; i < de_h.size(); ++i) de_sum[i] += de_h[i];
    for (std::size_t i = 0; i < da_h.size(); ++i) da_sum[i] += da_h[i];
  }
  res.total = res.per_rank[0];
  res.total.de = de_sum;
  res.total.dc = g.dc.download();
  res.total.dbias = g.dbias.download();
  res.total.da = da_sum;
  res.total.db = g.db.download();
  return res;
}

std::vector<int> shuffled_ranks(int ranks, std::mt19937_64& rng) {
  std::vector<int> order(static_cast<std::size_t>(ranks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// Sharded against the reference, every rank against rank 0 (bit for bit) and against the single call.
template <class T>
void run_case(const test::host_problem<T>& h, const std::vector<std::int64_t>& offsets, std::size_t budget,
              test::gradient_check mode, std::mt19937_64& rng) {
  INFO("shards: " << offsets.size() << " budget " << budget);
  const sharded_results s = run_sharded(h, offsets, shuffled_ranks(int(offsets.size()), rng), budget);
  for (const test::case_results& o : s.per_rank) {
    CHECK(std::memcmp(o.loss.data(), s.total.loss.data(), o.loss.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(o.lse.data(), s.total.lse.data(), o.lse.size() * sizeof(float)) == 0);
    CHECK(o.correct == s.total.correct);
  }
  test::check_case<T, float>(h, s.total, true, mode);

  const test::case_results whole = run_whole(h, budget);
  CHECK(test::relative_l2(s.total.loss, whole.loss) <= 1e-5);
  CHECK(test::relative_l2(s.total.lse, whole.lse) <= 1e-5);
  if (mode == test::gradient_check::relative) {
    const double tol = test::gradient_tolerance<T>(h.cfg.opts);
    CHECK(test::relative_l2(s.total.de, whole.de) <= tol);
    CHECK(test::relative_l2(s.total.dc, whole.dc) <= tol);
    CHECK(test::relative_l2(s.total.dbias, whole.dbias) <= tol);
    CHECK(test::relative_l2(s.total.da, whole.da) <= tol);
    CHECK(test::relative_l2(s.total.db, whole.db) <= tol);
  }
}

}  // namespace

TEST_CASE("GPU vocab-parallel: shards in sequence match the single call and the reference",
          "[gpu][vocab-parallel]") {
  std::mt19937_64 rng(31);
  // 2,000 classes: whole, halves, a 7-class shard, eight uneven shards (some narrower than a tile).
  const std::vector<std::vector<std::int64_t>> layouts = {
      {0}, {0, 1000}, {0, 7, 1300}, {0, 1, 64, 100, 777, 1024, 1500, 1999}};
  for (const auto& offsets : layouts) {
    for (bool exact : {true, false}) {
      test::case_config cfg;
      cfg.n = 300;
      cfg.d = 256;
      cfg.v = 2000;
      cfg.bias = true;
      cfg.class_weights = true;
      cfg.rank = 8;
      cfg.ignore_fraction = 0.2;
      cfg.seed = offsets.size() * 2 + exact;
      cfg.opts = exact ? options::exact() : options{};
      cfg.opts.softcap = 30.f;
      cfg.opts.label_smoothing = 0.1f;
      cfg.opts.z_loss = 1e-4f;
      auto h = test::make_problem<__nv_bfloat16>(cfg);
      for (std::size_t k = 0; k < offsets.size(); ++k) {  // every shard holds a target: its last class
        h.t64[2 * k + 1] = offsets[k] + test::shard_size(offsets, k, cfg.v) - 1;
        h.t32[2 * k + 1] = std::int32_t(h.t64[2 * k + 1]);
      }
      run_case(h, offsets, 0, test::gradient_check::relative, rng);
      run_case(h, offsets, 1, test::gradient_check::relative, rng);
    }
  }
}

TEST_CASE("GPU vocab-parallel: without smoothing the filter skips tiles in every shard", "[gpu][vocab-parallel]") {
  std::mt19937_64 rng(5);
  for (auto data : {test::regime::lm_like, test::regime::uniform, test::regime::peaked}) {
    test::case_config cfg;
    cfg.n = 300;
    cfg.d = 256;
    cfg.v = 2000;
    cfg.data = data;
    cfg.seed = 40 + int(data);
    run_case(test::make_problem<__nv_bfloat16>(cfg), {0, 500, 1203}, 0, test::gradient_check::relative, rng);
  }
}

TEST_CASE("GPU vocab-parallel: randomized shapes, options and layouts", "[gpu][vocab-parallel]") {
  std::mt19937_64 rng(777);
  for (int i = 0; i < 60; ++i) {
    const test::case_config cfg = test::random_config(rng, 160, 200, 700);
    const int ranks = int(std::min<std::int64_t>(cfg.v, std::vector<int>{1, 2, 3, 8}[std::size_t(i % 4)]));
    const auto offsets = test::random_cuts(rng, cfg.v, ranks);
    const std::size_t budget = i % 2 ? 0 : 1;
    switch (i % 3) {
      case 0: run_case(test::make_problem<__nv_bfloat16>(cfg), offsets, budget, test::gradient_check::bound, rng); break;
      case 1: run_case(test::make_problem<__half>(cfg), offsets, budget, test::gradient_check::bound, rng); break;
      default: run_case(test::make_problem<float>(cfg), offsets, budget, test::gradient_check::bound, rng); break;
    }
  }
}

TEST_CASE("GPU vocab-parallel: the gather order does not change a bit", "[gpu][vocab-parallel]") {
  test::case_config cfg;
  cfg.n = 257;
  cfg.d = 136;
  cfg.v = 1500;
  cfg.bias = true;
  const auto h = test::make_problem<__nv_bfloat16>(cfg);
  const std::vector<std::int64_t> offsets = {0, 100, 640, 1100};
  const auto a = run_sharded(h, offsets, {0, 1, 2, 3}, 0);
  const auto b = run_sharded(h, offsets, {3, 1, 0, 2}, 0);
  CHECK(std::memcmp(a.total.loss.data(), b.total.loss.data(), sizeof(float)) == 0);
  CHECK(a.total.lse == b.total.lse);
  CHECK(a.total.de == b.total.de);
  CHECK(a.total.dc == b.total.dc);
  CHECK(a.total.dbias == b.total.dbias);
}
