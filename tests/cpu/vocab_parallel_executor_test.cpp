// Vocabulary parallelism on the CPU tiled executor: R shards run shard_forward, their statistics are gathered in
// some rank order, every shard runs combine and backward; the loss and outputs of every rank, dE and dA summed over
// the shards and dC, dBias and dB put side by side must match the float64 reference of the whole problem.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>

#include <cce/host/tiled_executor.hpp>
#include "../common/case_check.hpp"
#include "../common/vocab_shards.hpp"

namespace {

using namespace cce;

struct aligned_buffer {
  std::unique_ptr<void, decltype(&std::free)> ptr{nullptr, &std::free};
  explicit aligned_buffer(std::size_t bytes) {
    if (bytes) ptr.reset(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
    if (bytes) std::memset(ptr.get(), 0, bytes);  // padding between carved buffers compares equal
  }
  void* get() const { return ptr.get(); }
};

struct sharded_run {
  std::vector<test::case_results> per_rank;  // forward outputs of every rank
  test::case_results total;                  // rank 0's outputs and the assembled gradients
  std::vector<std::vector<unsigned char>> saved;  // every rank's saved state after combine
};

// Runs the three steps for every shard; `gather` lists the ranks in the order their statistics are gathered.
template <class T>
sharded_run run_sharded(const test::host_problem<T>& h, const std::vector<std::int64_t>& offsets,
                        const std::vector<int>& gather, std::size_t budget, int bm = 16) {
  const test::case_config& cfg = h.cfg;
  const host::tiled_executor<T> ex(cfg.opts, bm, bm, device_info{80, 4});
  const problem<T> whole = h.view();
  const int ranks = int(offsets.size());
  std::vector<problem<T>> shard;
  for (int r = 0; r < ranks; ++r) {
    shard.push_back(test::shard_of(whole, offsets[std::size_t(r)], test::shard_size(offsets, std::size_t(r), cfg.v)));
  }
  const std::size_t stats_bytes = ex.shard_stats_bytes(shard[0]);
  std::vector<aligned_buffer> saved, ws;
  std::vector<std::size_t> saved_bytes, ws_bytes;
  aligned_buffer gathered(stats_bytes * std::size_t(ranks));
  std::vector<std::int64_t> gathered_offsets;
  for (int r = 0; r < ranks; ++r) {
    saved_bytes.push_back(ex.saved_bytes(shard[std::size_t(r)]));
    ws_bytes.push_back(ex.workspace_bytes(shard[std::size_t(r)], budget));
    saved.emplace_back(saved_bytes.back());
    ws.emplace_back(ws_bytes.back());
  }
  for (std::size_t slot = 0; slot < gather.size(); ++slot) {  // the all-gather
    const int r = gather[slot];
    aligned_buffer stats(stats_bytes);
    REQUIRE(ex.shard_forward(shard[std::size_t(r)], stats.get(), stats_bytes, saved[std::size_t(r)].get(),
                             saved_bytes[std::size_t(r)], ws[std::size_t(r)].get(), ws_bytes[std::size_t(r)]) ==
            status::success);
    std::memcpy(static_cast<unsigned char*>(gathered.get()) + slot * stats_bytes, stats.get(), stats_bytes);
    gathered_offsets.push_back(offsets[std::size_t(r)]);
  }
  const gathered_stats all{gathered.get(), stats_bytes * std::size_t(ranks), gathered_offsets.data(), ranks};

  sharded_run run;
  const std::size_t n = std::size_t(cfg.n);
  const bool none = cfg.opts.reduction == reduction::none;
  for (int r = 0; r < ranks; ++r) {
    test::case_results o;
    o.loss.assign(none ? n : 1, -7.f);  // poisoned: every element must be written
    o.lse.assign(n, -7.f);
    o.entropy.assign(n, -7.f);
    o.target_logprob.assign(n, -7.f);
    o.correct.assign(n, 7);
    forward_outputs out{o.loss.data(), o.lse.data(), o.entropy.data(), o.target_logprob.data(), o.correct.data(),
                        &o.error};
    REQUIRE(ex.combine(shard[std::size_t(r)], all, out, saved[std::size_t(r)].get(), saved_bytes[std::size_t(r)],
                       ws[std::size_t(r)].get(), ws_bytes[std::size_t(r)]) == status::success);
    const auto* s = static_cast<const unsigned char*>(saved[std::size_t(r)].get());
    run.saved.emplace_back(s, s + saved_bytes[std::size_t(r)]);
    run.per_rank.push_back(std::move(o));
  }
  run.total = run.per_rank[0];

  // Backward in float: the partial dE and dA of each rank are summed in fp32 (what an fp32 all-reduce does).
  const std::vector<float> grad = test::make_grad_loss(cfg);
  const bool acc = cfg.opts.accumulate;
  auto prefill = [&](std::size_t count, std::uint64_t salt) {
    return acc ? test::make_prefill(count, cfg.seed + salt) : std::vector<float>(count, -7.f);
  };
  std::vector<float> dc = prefill(std::size_t(cfg.v * cfg.d), 2);
  std::vector<float> dbias = cfg.bias ? prefill(std::size_t(cfg.v), 3) : std::vector<float>{};
  std::vector<float> db = cfg.rank ? prefill(std::size_t(cfg.v * cfg.rank), 5) : std::vector<float>{};
  std::vector<float> de_sum(n * std::size_t(cfg.d), 0.f), da_sum(std::size_t(cfg.rank * cfg.d), 0.f);
  for (int r = 0; r < ranks; ++r) {
    const problem<T>& p = shard[std::size_t(r)];
    // With accumulate, rank 0 adds the partial sums to the existing values and the others start from 0.
    std::vector<float> de = r == 0 ? prefill(de_sum.size(), 1) : std::vector<float>(de_sum.size(), 0.f);
    std::vector<float> da = r == 0 ? prefill(da_sum.size(), 4) : std::vector<float>(da_sum.size(), 0.f);
    gradients<float> g;
    g.de = de.data();
    g.dc = dc.data() + p.shard.offset * cfg.d;
    g.dbias = cfg.bias ? dbias.data() + p.shard.offset : nullptr;
    g.da = cfg.rank ? da.data() : nullptr;
    g.db = cfg.rank ? db.data() + p.shard.offset * cfg.rank : nullptr;
    REQUIRE(ex.backward(p, loss_gradient{grad.data()}, g, saved[std::size_t(r)].get(), saved_bytes[std::size_t(r)],
                        ws[std::size_t(r)].get(), ws_bytes[std::size_t(r)]) == status::success);
    for (std::size_t i = 0; i < de.size(); ++i) de_sum[i] += de[i];
    for (std::size_t i = 0; i < da.size(); ++i) da_sum[i] += da[i];
  }
  run.total.de = de_sum;
  run.total.dc = dc;
  run.total.dbias = dbias;
  run.total.da = da_sum;
  run.total.db = db;
  return run;
}

std::vector<int> rank_order(int ranks) {
  std::vector<int> order(static_cast<std::size_t>(ranks));
  std::iota(order.begin(), order.end(), 0);
  return order;
}

// Every rank computes the same forward results, bit for bit.
void check_ranks_agree(const sharded_run& run) {
  for (const test::case_results& o : run.per_rank) {
    CHECK(std::memcmp(o.loss.data(), run.per_rank[0].loss.data(), o.loss.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(o.lse.data(), run.per_rank[0].lse.data(), o.lse.size() * sizeof(float)) == 0);
    CHECK(o.correct == run.per_rank[0].correct);
  }
}

template <class T>
void run_case(const test::host_problem<T>& h, const std::vector<std::int64_t>& offsets, std::size_t budget,
              test::gradient_check mode, std::mt19937_64& rng) {
  std::vector<int> gather = rank_order(int(offsets.size()));
  std::shuffle(gather.begin(), gather.end(), rng);
  INFO("shards: " << offsets.size() << " budget " << budget);
  const sharded_run run = run_sharded(h, offsets, gather, budget);
  check_ranks_agree(run);
  test::check_case<T, float>(h, run.total, true, mode);
}

template <class T>
void run_case(const test::case_config& cfg, const std::vector<std::int64_t>& offsets, std::size_t budget,
              test::gradient_check mode, std::mt19937_64& rng) {
  run_case(test::make_problem<T>(cfg), offsets, budget, mode, rng);
}

test::case_config featured_case(std::uint64_t seed) {
  test::case_config cfg;
  cfg.n = 64;
  cfg.d = 40;
  cfg.v = 150;
  cfg.bias = true;
  cfg.class_weights = true;
  cfg.rank = 4;
  cfg.ignore_fraction = 0.2;
  cfg.seed = seed;
  cfg.opts.softcap = 20.f;
  cfg.opts.label_smoothing = 0.1f;
  cfg.opts.z_loss = 1e-3f;
  return cfg;
}

// Shard layouts of 150 classes: whole, halves, thirds, eight uneven shards with some smaller than a 16-wide tile.
const std::vector<std::vector<std::int64_t>> featured_layouts = {
    {0}, {0, 75}, {0, 3, 100}, {0, 1, 17, 40, 44, 90, 101, 149}};

}  // namespace

TEST_CASE("vocab-parallel: R shards match the float64 reference of the whole vocabulary", "[vocab-parallel][executor]") {
  std::mt19937_64 rng(97);
  for (const auto& offsets : featured_layouts) {
    for (bool exact : {true, false}) {
      for (auto red : {reduction::mean, reduction::sum, reduction::none}) {
        test::case_config cfg = featured_case(offsets.size() * 10 + exact);
        cfg.opts.filter = exact ? filter_mode::none : filter_mode::automatic;
        cfg.opts.deterministic = exact;
        cfg.opts.reduction = red;
        // Every shard holds some row's target: row 2k + 1 aims at the last class of shard k.
        auto h = test::make_problem<__nv_bfloat16>(cfg);
        for (std::size_t k = 0; k < offsets.size(); ++k) {
          h.t64[2 * k + 1] = offsets[k] + test::shard_size(offsets, k, cfg.v) - 1;
          h.t32[2 * k + 1] = std::int32_t(h.t64[2 * k + 1]);
        }
        run_case(h, offsets, 0, test::gradient_check::relative, rng);
        run_case(h, offsets, 1, test::gradient_check::relative, rng);
      }
    }
  }
}

TEST_CASE("vocab-parallel: every shard's backward sorted", "[vocab-parallel][executor][sort]") {
  std::mt19937_64 rng(98);
  for (const auto& offsets : featured_layouts) {
    for (bool exact : {true, false}) {
      test::case_config cfg = featured_case(offsets.size() * 10 + exact);
      cfg.opts.filter = exact ? filter_mode::none : filter_mode::automatic;
      cfg.opts.deterministic = exact;
      cfg.opts.label_smoothing = 0.f;  // smoothing turns the filter off
      cfg.opts.vocab_sort = true;
      auto h = test::make_problem<__nv_bfloat16>(cfg);
      for (std::size_t k = 0; k < offsets.size(); ++k) {
        h.t64[2 * k + 1] = offsets[k] + test::shard_size(offsets, k, cfg.v) - 1;
        h.t32[2 * k + 1] = std::int32_t(h.t64[2 * k + 1]);
      }
      run_case(h, offsets, 0, test::gradient_check::relative, rng);
      run_case(h, offsets, 1, test::gradient_check::relative, rng);
    }
  }
}

TEST_CASE("vocab-parallel: randomized shapes, options and shard layouts", "[vocab-parallel][executor]") {
  std::mt19937_64 rng(20261126);
  for (int i = 0; i < 400; ++i) {
    const test::case_config cfg = test::random_config(rng, 40, 40, 80);
    const int ranks = int(std::min<std::int64_t>(cfg.v, std::vector<int>{1, 2, 3, 8}[std::size_t(i % 4)]));
    const auto offsets = test::random_cuts(rng, cfg.v, ranks);
    const std::size_t budget = i % 3 == 0 ? 0 : i % 3 == 1 ? 1 : 24 * 1024;
    switch (i % 3) {
      case 0: run_case<__nv_bfloat16>(cfg, offsets, budget, test::gradient_check::bound, rng); break;
      case 1: run_case<__half>(cfg, offsets, budget, test::gradient_check::bound, rng); break;
      default: run_case<float>(cfg, offsets, budget, test::gradient_check::bound, rng); break;
    }
  }
}

TEST_CASE("vocab-parallel: one shard is the unsharded path, bit for bit", "[vocab-parallel][executor]") {
  test::case_config cfg = featured_case(5);
  cfg.opts.filter = filter_mode::automatic;
  const auto h = test::make_problem<__nv_bfloat16>(cfg);
  const sharded_run run = run_sharded(h, {0}, {0}, 0);

  const host::tiled_executor<__nv_bfloat16> ex(cfg.opts, 16, 16, device_info{80, 4});
  const problem<__nv_bfloat16> p = h.view();
  aligned_buffer saved(ex.saved_bytes(p)), ws(ex.workspace_bytes(p));
  test::case_results o;
  o.loss.assign(1, 0.f);
  o.lse.assign(std::size_t(cfg.n), 0.f);
  o.correct.assign(std::size_t(cfg.n), 0);
  forward_outputs out{o.loss.data(), o.lse.data(), nullptr, nullptr, o.correct.data(), nullptr};
  REQUIRE(ex.forward(p, out, saved.get(), ex.saved_bytes(p), ws.get(), ex.workspace_bytes(p)) == status::success);
  CHECK(std::memcmp(o.loss.data(), run.total.loss.data(), sizeof(float)) == 0);
  CHECK(std::memcmp(o.lse.data(), run.total.lse.data(), o.lse.size() * sizeof(float)) == 0);
  CHECK(o.correct == run.total.correct);
  CHECK(std::memcmp(saved.get(), run.saved[0].data(), run.saved[0].size()) == 0);
}

TEST_CASE("vocab-parallel: the gather order does not change a bit", "[vocab-parallel][executor]") {
  const test::case_config cfg = featured_case(9);
  const auto h = test::make_problem<float>(cfg);
  const std::vector<std::int64_t> offsets = featured_layouts.back();
  const sharded_run in_order = run_sharded(h, offsets, rank_order(8), 0);
  const sharded_run reversed = run_sharded(h, offsets, {7, 6, 5, 4, 3, 2, 1, 0}, 0);
  CHECK(in_order.saved == reversed.saved);
  CHECK(std::memcmp(in_order.total.loss.data(), reversed.total.loss.data(), sizeof(float)) == 0);
  CHECK(in_order.total.de == reversed.total.de);
  CHECK(in_order.total.dc == reversed.total.dc);
}

TEST_CASE("vocab-parallel: bad shard layouts are refused or reported", "[vocab-parallel][executor]") {
  const test::case_config cfg = featured_case(3);
  const auto h = test::make_problem<float>(cfg);
  const host::tiled_executor<float> ex(cfg.opts);
  const problem<float> whole = h.view();
  const problem<float> first = test::shard_of(whole, 0, 75), second = test::shard_of(whole, 75, 75);
  aligned_buffer saved(ex.saved_bytes(first)), ws(ex.workspace_bytes(first));
  const std::size_t sb = ex.saved_bytes(first), wb = ex.workspace_bytes(first), stats = ex.shard_stats_bytes(first);
  aligned_buffer gathered(2 * stats);
  float loss = 0.f;
  int error = 0;
  forward_outputs out;
  out.loss = &loss;
  out.error = &error;

  SECTION("a shard past the vocabulary, or an offset without a global size") {
    problem<float> p = test::shard_of(whole, 80, 75);
    CHECK(ex.shard_forward(p, gathered.get(), stats, saved.get(), sb, ws.get(), wb) == status::invalid_size);
    p.shard = {5, 0};
    CHECK(ex.shard_forward(p, gathered.get(), stats, saved.get(), sb, ws.get(), wb) == status::invalid_size);
  }
  SECTION("forward of a shard") {
    CHECK(ex.forward(first, out, saved.get(), sb, ws.get(), wb) == status::invalid_option);
  }
  SECTION("a statistics buffer that is too small") {
    CHECK(ex.shard_forward(first, gathered.get(), stats - 1, saved.get(), sb, ws.get(), wb) ==
          status::workspace_too_small);
  }
  SECTION("offsets that do not cut the vocabulary into shards") {
    for (const std::vector<std::int64_t>& offsets : std::vector<std::vector<std::int64_t>>{{0, 0}, {1, 75}, {0, 150}}) {
      const gathered_stats g{gathered.get(), 2 * stats, offsets.data(), 2};
      CHECK(ex.combine(first, g, out, saved.get(), sb, ws.get(), wb) == status::invalid_size);
    }
    const std::int64_t offsets[2] = {0, 75};
    CHECK(ex.combine(first, gathered_stats{gathered.get(), 2 * stats, offsets, 0}, out, saved.get(), sb, ws.get(),
                     wb) == status::invalid_size);
    CHECK(ex.combine(first, gathered_stats{gathered.get(), 2 * stats, nullptr, 2}, out, saved.get(), sb, ws.get(),
                     wb) == status::null_pointer);
    CHECK(ex.combine(first, gathered_stats{gathered.get(), 2 * stats - 1, offsets, 2}, out, saved.get(), sb,
                     ws.get(), wb) == status::workspace_too_small);
  }
  SECTION("offsets that do not describe the gathered buffers") {
    auto* base = static_cast<unsigned char*>(gathered.get());
    REQUIRE(ex.shard_forward(first, base, stats, saved.get(), sb, ws.get(), wb) == status::success);
    REQUIRE(ex.shard_forward(second, base + stats, stats, saved.get(), sb, ws.get(), wb) == status::success);
    const std::int64_t swapped[2] = {75, 0};
    REQUIRE(ex.combine(first, gathered_stats{base, 2 * stats, swapped, 2}, out, saved.get(), sb, ws.get(), wb) ==
            status::success);
    CHECK(error == int(status::invalid_size));
    CHECK(std::isnan(loss));
    const std::int64_t right[2] = {0, 75};
    error = 0;
    REQUIRE(ex.combine(first, gathered_stats{base, 2 * stats, right, 2}, out, saved.get(), sb, ws.get(), wb) ==
            status::success);
    CHECK(error == 0);
    CHECK(std::isfinite(loss));
  }
}
