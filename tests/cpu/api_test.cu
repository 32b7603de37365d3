// Host-side contract of the public API, checked without a GPU: every bad argument returns its status before
// anything runs, size queries are pure host functions, and the operating points respect their budgets.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <cce/cce.cuh>
#include <cce/host/tiled_executor.hpp>
#include "common/launch.hpp"

namespace {

using namespace cce;
using bf16 = __nv_bfloat16;

// A well-formed problem over host buffers (never dereferenced by the checks under test).
struct fixture {
  std::vector<bf16> e = std::vector<bf16>(64 * 32), c = std::vector<bf16>(100 * 32), bias = std::vector<bf16>(100);
  std::vector<std::int64_t> y = std::vector<std::int64_t>(64, 1);
  problem<bf16> p;
  fixture() {
    p.n = 64;
    p.d = 32;
    p.v = 100;
    p.e = e.data();
    p.c = c.data();
    p.targets = y.data();
  }
};

status check(const problem<bf16>& p, const options& o = {}) { return detail::validate_problem(p, o); }

}  // namespace

TEST_CASE("every status has its own message", "[api]") {
  std::set<std::string> seen;
  for (int s = int(status::success); s <= int(status::collective_error); ++s) {
    const std::string m = to_string(status(s));
    CHECK(!m.empty());
    CHECK(m != "unknown status");
    seen.insert(m);
  }
  CHECK(seen.size() == std::size_t(status::collective_error) + 1);
}

TEST_CASE("bad problems are rejected with their status", "[api]") {
  fixture f;
  CHECK(check(f.p) == status::success);
  auto with = [&](auto change) {
    problem<bf16> p = f.p;
    change(p);
    return check(p);
  };
  CHECK(with([](auto& p) { p.e = nullptr; }) == status::null_pointer);
  CHECK(with([](auto& p) { p.c = nullptr; }) == status::null_pointer);
  CHECK(with([](auto& p) { p.targets = nullptr; }) == status::null_pointer);
  CHECK(with([](auto& p) { p.n = -1; }) == status::invalid_size);
  CHECK(with([](auto& p) { p.d = 0; }) == status::invalid_size);
  CHECK(with([](auto& p) { p.v = 0; }) == status::invalid_size);
  CHECK(with([](auto& p) { p.lde = 31; }) == status::invalid_stride);
  CHECK(with([](auto& p) { p.ldc = 16; }) == status::invalid_stride);
  CHECK(with([](auto& p) { p.lora.rank = -1; }) == status::invalid_size);
  CHECK(with([](auto& p) { p.lora.rank = 4; }) == status::null_pointer);
  CHECK(with([&](auto& p) {
          p.lora.rank = 4;
          p.lora.a = f.e.data();
          p.lora.b = f.c.data();
          p.lora.lda = 8;
        }) == status::invalid_stride);
  CHECK(with([&](auto& p) { p.e = reinterpret_cast<const bf16*>(reinterpret_cast<const char*>(f.e.data()) + 1); }) ==
        status::misaligned_pointer);
  CHECK(with([&](auto& p) { p.targets = reinterpret_cast<const char*>(f.y.data()) + 4; }) ==
        status::misaligned_pointer);
  // N = 0 is a valid (empty) problem; its inputs may be null.
  CHECK(with([](auto& p) {
          p.n = 0;
          p.e = nullptr;
          p.targets = nullptr;
        }) == status::success);
}

TEST_CASE("bad options are rejected with invalid_option", "[api]") {
  fixture f;
  auto with = [&](auto change) {
    options o;
    change(o);
    return check(f.p, o);
  };
  CHECK(with([](options& o) { o.temperature = 0.f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.temperature = -1.f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.temperature = INFINITY; }) == status::invalid_option);
  CHECK(with([](options& o) { o.softcap = -1.f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.softcap = NAN; }) == status::invalid_option);
  CHECK(with([](options& o) { o.label_smoothing = -0.1f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.label_smoothing = 1.5f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.z_loss = -1e-4f; }) == status::invalid_option);
  CHECK(with([](options& o) {
          o.filter = filter_mode::threshold;
          o.filter_eps = -1.f;
        }) == status::invalid_option);
  CHECK(with([](options& o) { o.uniform_tolerance = -1.f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.uniform_tolerance = NAN; }) == status::invalid_option);
  CHECK(with([](options& o) { o.uniform_tolerance = 1.f / 16; }) == status::success);
  CHECK(with([](options& o) { o.shift = -1; }) == status::invalid_option);
  CHECK(with([](options& o) { o.shift = 1; }) == status::invalid_size);  // shift needs seq_len
  CHECK(with([](options& o) { o.label_smoothing = 1.f; }) == status::success);
  CHECK(with([](options& o) { o.softcap = 30.f; }) == status::success);
}

TEST_CASE("the functor rejects bad arguments before touching the device", "[api]") {
  fixture f;
  const linear_cross_entropy<bf16> op{};
  forward_outputs out;  // no loss pointer
  problem<bf16> p = f.p;
  CHECK(test::forward(op, p, out, nullptr, 0, nullptr, 0) == status::null_pointer);
  p.d = 0;
  float loss = 0.f;
  out.loss = &loss;
  CHECK(test::forward(op, p, out, nullptr, 0, nullptr, 0) == status::invalid_size);
  gradients<bf16> g;
  g.dbias = f.bias.data();  // a bias gradient without a bias
  CHECK(test::backward(op, f.p, {}, g, nullptr, 0, nullptr, 0) == status::invalid_option);
  g = {};
  g.da = f.bias.data();  // a LoRA gradient without a LoRA head
  CHECK(test::backward(op, f.p, {}, g, nullptr, 0, nullptr, 0) == status::invalid_option);
  g = {};
  g.ld_de = 8;
  CHECK(test::backward(op, f.p, {}, g, nullptr, 0, nullptr, 0) == status::invalid_stride);
  CHECK(op.can_implement(f.p, device_info{75, 40}) == status::unsupported_arch);
  CHECK(op.can_implement(f.p, device_info{90, 132}) == status::success);
}

TEST_CASE("workspace and saved buffers are checked", "[api]") {
  fixture f;
  const host::tiled_executor<bf16> ex(options{});
  const std::size_t saved = ex.saved_bytes(f.p), work = ex.workspace_bytes(f.p);
  std::vector<unsigned char> buf_saved(saved + 256), buf_work(work + 256);
  auto align = [](std::vector<unsigned char>& b) {
    auto a = reinterpret_cast<std::uintptr_t>(b.data());
    return reinterpret_cast<void*>((a + 255) / 256 * 256);
  };
  float loss = 0.f;
  forward_outputs out;
  out.loss = &loss;
  CHECK(ex.forward(f.p, out, nullptr, saved, align(buf_work), work) == status::null_pointer);
  CHECK(ex.forward(f.p, out, align(buf_saved), saved - 1, align(buf_work), work) == status::workspace_too_small);
  CHECK(ex.forward(f.p, out, align(buf_saved), saved, nullptr, work) == status::null_pointer);
  CHECK(ex.forward(f.p, out, static_cast<char*>(align(buf_saved)) + 4, saved, align(buf_work), work) ==
        status::misaligned_pointer);
}

TEST_CASE("operating points respect their budgets at every benchmark shape", "[api][plan]") {
  struct shape {
    std::int64_t n, d, v;
  };
  const shape shapes[] = {{8192, 2304, 256000}, {8192, 4096, 128256}, {8192, 5120, 131072}, {8192, 3072, 32064},
                          {8192, 3584, 152064}, {8192, 768, 50304},   {65536, 768, 50304},  {65536, 2304, 256000}};
  const device_info h100{90, 132};
  for (const shape& s : shapes) {
    problem<bf16> p;
    p.n = s.n;
    p.d = s.d;
    p.v = s.v;
    options minimal;
    minimal.backward_mode = backward_mode::minimal;
    const linear_cross_entropy<bf16> op_min{minimal}, op{};
    // Each mode's extra memory: the saved state and the workspace together.
    const std::size_t saved = op.saved_bytes(p);
    const std::size_t min_bytes = op_min.workspace_bytes(p, h100, (std::size_t(64) << 20) - saved);
    const std::size_t chunk_bytes = op.workspace_bytes(p, h100, std::size_t(256) << 20);
    INFO("n=" << s.n << " d=" << s.d << " v=" << s.v);
    CHECK(min_bytes + saved <= (std::size_t(64) << 20));
    CHECK(chunk_bytes <= (std::size_t(256) << 20));
    CHECK(op_min.mode(p, h100, min_bytes) == backward_mode::minimal);
    CHECK(op_min.workspace_bytes(p, h100, min_bytes) == min_bytes);
    // Saved state is O(N + tiles), never O(N * V).
    CHECK(op.saved_bytes(p) <
          std::size_t(s.n) * 16 + std::size_t(s.n / 128 + 1) * std::size_t(s.v / 128 + 1) * 8 + 4096);
    // Asking again with the size that was returned gives the same plan (the size is the budget).
    CHECK(op.workspace_bytes(p, h100, chunk_bytes) == chunk_bytes);
  }
}

// loss_and_grad's logit blocks (plan_kept_logits): within the budget at every benchmark shape, as few as fit and
// evened out, planned again from the size returned; none where the sm_90a forward cannot write them or the blocks
// would be short.
TEST_CASE("loss_and_grad plans logit blocks within its budget", "[api][plan]") {
  using policy = tile::default_policy_t<bf16>;
  options o;
  o.backward_mode = backward_mode::loss_and_grad;
  const device_info h100{90, 132}, a100{80, 108};
  const std::size_t gib = std::size_t(1) << 30;
  auto plan_for = [&](std::int64_t n, std::int64_t d, std::int64_t v, const options& opt, const device_info& dev,
                      std::size_t budget) {
    return detail::make_plan<bf16>(n, d, v, 0, false, opt, policy::bm, policy::bn, dev, budget, false, 0,
                                   policy::forward_ctas_per_sm);
  };
  struct shape {
    std::int64_t d, v, rows;  // N = 8,192: the rows of each block at 1 GiB
  };
  const shape shapes[] = {{2304, 256000, 2048}, {4096, 128256, 4096}, {5120, 131072, 2816},
                          {3072, 32064, 8192},  {3584, 152064, 2816}, {768, 50304, 8192}};
  for (const shape& s : shapes) {
    INFO("d=" << s.d << " v=" << s.v);
    const detail::plan pl = plan_for(8192, s.d, s.v, o, h100, 0);
    CHECK(pl.kept_rows == s.rows);
    const std::size_t bytes = pl.workspace_bytes<bf16>();
    CHECK(bytes <= gib);
    const detail::plan again = plan_for(8192, s.d, s.v, o, h100, bytes);
    CHECK(again.kept_rows == pl.kept_rows);
    CHECK(again.workspace_bytes<bf16>() == bytes);
  }
  CHECK(plan_for(8192, 4096, 128256, o, h100, std::size_t(256) << 20).kept_rows == 1024);
  CHECK(plan_for(8192, 4096, 128256, o, h100, std::size_t(150) << 20).kept_rows == 512);
  CHECK(plan_for(8192, 4096, 128256, o, h100, std::size_t(100) << 20).kept_rows == 0);  // blocks under 512 rows
  CHECK(plan_for(8192, 4096, 128256, o, a100, 0).kept_rows == 0);
  options sorted = o, kahan = o, chunked;
  sorted.vocab_sort = true;
  kahan.accum = accumulation::kahan;
  CHECK(plan_for(8192, 4096, 128256, sorted, h100, 0).kept_rows == 0);
  CHECK(plan_for(8192, 4096, 128256, kahan, h100, 0).kept_rows == 0);  // several blocks
  CHECK(plan_for(8192, 768, 50304, kahan, h100, 0).kept_rows == 8192);  // one
  CHECK(plan_for(8192, 4096, 128256, chunked, h100, 0).kept_rows == 0);
  CHECK(detail::make_plan<float>(8192, 4096, 32000, 0, false, o, 128, 128, h100, 0).kept_rows == 0);
}

// The first-order baseline's plan for the GPU case "rows near-uniform to first order skip every tile": at N = 600,
// D = 256 (its variant 8) one fp32 sum of C^T C fits in the slab's place and the sm_90a path sums two halves of the
// vocabulary onto it, at N = 1,200 (variant 9) two fit and four parts add onto them; at N = 200 (its other variants)
// none does, and the product takes the whole depth. At gpt2's shape (12 tiles with work, D = 768) five fit and ten
// parts take one round of the H100's SMs. The rows' Gram matrix (depth N) takes as many carries, after the slab.
TEST_CASE("the first-order baseline sums C^T C and the rows' Gram matrix in parts at the GPU case's shapes",
          "[api][plan]") {
  using policy = tile::default_policy_t<bf16>;
  const device_info h100{90, 132};
  options o;
  o.uniform_tolerance = 1.f / 16;
  auto plan_for = [&](std::int64_t n, std::int64_t d, std::int64_t v) {
    return detail::make_plan<bf16>(n, d, v, 0, false, o, policy::bm, policy::bn, h100, 0, false, 0,
                                   policy::forward_ctas_per_sm);
  };
  auto carries = [](const detail::plan& pl) { return pl.gram_sums_fit<bf16>(pl.linear_slab_cols); };
  const detail::plan halves = plan_for(600, 256, 16000), quarters = plan_for(1200, 256, 16000),
                     whole = plan_for(200, 256, 16000), gpt2 = plan_for(8192, 768, 50304);
  REQUIRE(halves.linear());
  CHECK(carries(halves) == 1);
  CHECK(detail::sm90::symmetric_k_splits(256, 16000, h100.sm_count, carries(halves)) == 2);
  REQUIRE(quarters.linear());
  CHECK(carries(quarters) == 2);
  CHECK(detail::sm90::symmetric_k_splits(256, 16000, h100.sm_count, carries(quarters)) == 4);
  REQUIRE(whole.linear());
  CHECK(carries(whole) == 0);
  REQUIRE(gpt2.linear());
  CHECK(carries(gpt2) == 5);
  CHECK(detail::sm90::symmetric_k_splits(768, 50304, h100.sm_count, carries(gpt2)) == 10);
  CHECK(halves.row_gram_carries == 1);
  CHECK(detail::sm90::symmetric_k_splits(256, 600, h100.sm_count, halves.row_gram_carries) == 2);
  CHECK(quarters.row_gram_carries == 2);
  CHECK(detail::sm90::symmetric_k_splits(256, 1200, h100.sm_count, quarters.row_gram_carries) == 4);
  CHECK(whole.row_gram_carries == 0);
  CHECK(gpt2.row_gram_carries == 5);
  CHECK(detail::sm90::symmetric_k_splits(768, 8192, h100.sm_count, gpt2.row_gram_carries) == 10);
  CHECK(detail::sm90::symmetric_k_splits(768, 50304, h100.sm_count, 1) == 2);
  CHECK(detail::sm90::symmetric_k_splits(3072, 32064, h100.sm_count, 1) == 2);  // phi3.5: 3 rounds of half against 2 of the whole
}

// The walk's tile flags in one launch (plan::walk_flags): planned for the sm_90a dlogit kernel on 16-bit inputs
// where no pass needs flags of its own, and carved as a flag per tile of the grid, with the compacted walk's buffers.
TEST_CASE("the walk's tile flags are planned where the sm_90a walk reads them", "[api][plan]") {
  using policy = tile::default_policy_t<bf16>;
  const device_info h100{90, 132}, a100{80, 108};
  auto plan_for = [&](const options& o, bool bias, std::int64_t rank, const device_info& dev) -> detail::plan {
    return detail::make_plan<bf16>(8192, 768, 50304, rank, bias, o, policy::bm, policy::bn, dev, 0, false,
                                   o.vocab_sort ? 1 : 0, policy::forward_ctas_per_sm);
  };
  const options defaults;
  const detail::plan pl = plan_for(defaults, false, 0, h100);
  REQUIRE(pl.walk_flags);
  void* base = reinterpret_cast<void*>(std::uintptr_t(1) << 20);  // never dereferenced: the carve's offsets
  const auto bw = pl.carve_backward<bf16>(base);
  REQUIRE(bw.walk_flags != nullptr);
  REQUIRE(bw.baseline.row_scale != nullptr);  // carved next
  CHECK(reinterpret_cast<const char*>(bw.baseline.row_scale) - reinterpret_cast<const char*>(bw.walk_flags) >=
        pl.grid.tiles());
  // The compacted walk's slot map (an int per tile), first slots (one per row tile) and state; its slots, 128 x 128
  // tiles of dZ, lie in the passes' region.
  REQUIRE(bw.compact.slot != nullptr);
  CHECK(reinterpret_cast<const char*>(bw.compact.slot) - reinterpret_cast<const char*>(bw.walk_flags) >=
        pl.grid.tiles());
  CHECK(bw.compact.row_first - bw.compact.slot >= pl.grid.tiles());
  CHECK(bw.compact.state - bw.compact.row_first >= pl.grid.row_tiles());
  CHECK(reinterpret_cast<const char*>(bw.baseline.row_scale) - reinterpret_cast<const char*>(bw.compact.state) >=
        std::ptrdiff_t(sizeof(int)) * detail::compact_state_count);
  CHECK(pl.compact_capacity() > 0);
  CHECK(std::size_t(pl.compact_capacity()) * pl.grid.bm * pl.grid.bn * sizeof(bf16) <= pl.pass_region_bytes<bf16>());

  options sorted, one_gradient, portable;
  sorted.vocab_sort = true;
  one_gradient.filter_dc = false;
  portable.hopper_kernels = false;
  const detail::plan with_bias = plan_for(defaults, true, 0, h100);
  CHECK_FALSE(with_bias.walk_flags);                             // its skipped tiles' column sums per chunk
  CHECK_FALSE(plan_for(defaults, false, 4, h100).walk_flags);    // the low-rank head's thin products: the pass's
  CHECK_FALSE(plan_for(sorted, false, 0, h100).walk_flags);      // decided from the recomputed tiles
  CHECK_FALSE(plan_for(one_gradient, false, 0, h100).walk_flags);  // two sets of flags
  CHECK_FALSE(plan_for(portable, false, 0, h100).walk_flags);
  CHECK_FALSE(plan_for(defaults, false, 0, a100).walk_flags);
  const detail::plan fp32 = detail::make_plan<float>(8192, 768, 50304, 0, false, defaults, policy::bm, policy::bn,
                                                     h100, 0, false, 0, policy::forward_ctas_per_sm);
  CHECK_FALSE(fp32.walk_flags);
  CHECK(with_bias.carve_backward<bf16>(base).walk_flags == nullptr);
  CHECK(with_bias.carve_backward<bf16>(base).compact.slot == nullptr);
  CHECK(with_bias.compact_capacity() == 0);
}

// The closed form of the sm_90a forward's busiest walker against walking the units one by one, over grids that
// take every branch: one walker, more walkers than units, groups of one row tile, a group larger than the grid, splits
// that divide the tiles and splits that do not.
TEST_CASE("plan: the busiest walker of the forward's round-robin units", "[api][plan]") {
  std::vector<std::int64_t> step(133);
  for (std::int64_t m : {1, 3, 16, 33, 64})
    for (std::int64_t tiles : {1, 7, 126, 197})
      for (std::int64_t splits = 1; splits <= tiles && splits <= 40; splits += 3)
        for (std::int64_t walkers : {1, 5, 66, 132})
          for (std::int64_t group : {1, 10, 21, 500}) {
            std::vector<std::int64_t> walked(std::size_t(walkers), 0);
            for (std::int64_t u = 0; u < m * splits; ++u) {
              const tile::grouped_order at{int(u), int(m), int(splits), int(group)};
              walked[std::size_t(u % walkers)] +=
                  tile::split_begin(tiles, splits, at.n + 1) - tile::split_begin(tiles, splits, at.n);
            }
            std::int64_t most = 0;
            for (std::int64_t w : walked) most = std::max(most, w);
            INFO("m " << m << " tiles " << tiles << " splits " << splits << " walkers " << walkers << " group " << group);
            CHECK(detail::busiest_walker_tiles(m, splits, group, tiles, walkers, step.data()) == most);
          }
}

// The splits the sm_90a forward takes on an H100 (132 SMs): phi3.5's short units on 66 persistent clusters go from
// 33 splits (busiest cluster 64 tiles) to 35 (62); long units, other devices and fp32 keep the CTA count's splits.
TEST_CASE("plan: the sm_90a forward's splits for an even walk", "[api][plan]") {
  const device_info h100{90, 132}, a100{80, 108};
  const options opt{};
  CHECK(detail::sm90_forward_splits<bf16>(33, 64, 3072, 32064, h100, opt) == 35);
  std::int64_t step[67];
  CHECK(detail::busiest_walker_tiles(32, 35, 10, 126, 66, step) == 62);
  CHECK(detail::busiest_walker_tiles(32, 33, 10, 126, 66, step) == 64);
  CHECK(detail::sm90_forward_splits<bf16>(3, 64, 4096, 128256, h100, opt) == 3);  // llama3: long units
  CHECK(detail::sm90_forward_splits<bf16>(33, 64, 3072, 32064, a100, opt) == 33);
  CHECK(detail::sm90_forward_splits<float>(33, 64, 3072, 32064, h100, opt) == 33);
  CHECK(detail::sm90_forward_splits<bf16>(33, 64, 3072, 32064, device_info{90, 2000}, opt) == 33);  // past the scratch
  options portable{};
  portable.hopper_kernels = false;
  CHECK(detail::sm90_forward_splits<bf16>(33, 64, 3072, 32064, h100, portable) == 33);
}

TEST_CASE("every input of the reliability list is checked on the host", "[api][bad-input]") {
  fixture f;
  auto with = [&](auto change) {
    problem<bf16> p = f.p;
    change(p);
    return check(p);
  };
  auto shifted = [](const void* p, int bytes) { return static_cast<const char*>(p) + bytes; };
  std::vector<float> weights(100, 1.f);
  std::vector<std::int32_t> y32(64, 1);

  // Target index types other than int32 and int64 have no kernel.
  CHECK(with([](auto& p) { p.targets_type = target_type(7); }) == status::unsupported_dtype);
  // Sizes: V must fit the kernels' int32 class indices; V = 1 and D = 1 are valid problems.
  CHECK(with([](auto& p) { p.v = std::int64_t(INT32_MAX); }) == status::invalid_size);
  CHECK(with([](auto& p) { p.v = 1; }) == status::success);
  CHECK(with([](auto& p) { p.d = 1; }) == status::success);
  CHECK(with([](auto& p) { p.d = -3; }) == status::invalid_size);
  // Strides: negative ones and the low-rank head's B.
  CHECK(with([](auto& p) { p.lde = -64; }) == status::invalid_stride);
  CHECK(with([&](auto& p) {
          p.lora.rank = 4;
          p.lora.a = f.e.data();
          p.lora.b = f.c.data();
          p.lora.ldb = 3;
        }) == status::invalid_stride);
  // Rank 0 disables the head: whatever its pointers hold is never used.
  CHECK(with([&](auto& p) {
          p.lora.a = nullptr;
          p.lora.b = f.c.data();
          p.lora.ldb = 1;
        }) == status::success);
  // Every input pointer is checked for the alignment of its element type.
  CHECK(with([&](auto& p) { p.c = reinterpret_cast<const bf16*>(shifted(f.c.data(), 1)); }) ==
        status::misaligned_pointer);
  CHECK(with([&](auto& p) { p.bias = reinterpret_cast<const bf16*>(shifted(f.bias.data(), 1)); }) ==
        status::misaligned_pointer);
  CHECK(with([&](auto& p) { p.class_weights = reinterpret_cast<const float*>(shifted(weights.data(), 2)); }) ==
        status::misaligned_pointer);
  CHECK(with([&](auto& p) {
          p.lora.rank = 4;
          p.lora.a = reinterpret_cast<const bf16*>(shifted(f.e.data(), 1));
          p.lora.b = f.c.data();
        }) == status::misaligned_pointer);
  CHECK(with([&](auto& p) {
          p.lora.rank = 4;
          p.lora.a = f.e.data();
          p.lora.b = reinterpret_cast<const bf16*>(shifted(f.c.data(), 1));
        }) == status::misaligned_pointer);
  // int32 targets need 4-byte alignment only.
  CHECK(with([&](auto& p) {
          p.targets_type = target_type::int32;
          p.targets = shifted(y32.data(), 4);
        }) == status::success);
  CHECK(with([&](auto& p) {
          p.targets_type = target_type::int32;
          p.targets = shifted(y32.data(), 2);
        }) == status::misaligned_pointer);
  // ignore_index is any int64, including a valid class (that class is then never a target).
  for (std::int64_t ignore : {std::int64_t(-1), std::int64_t(0), std::int64_t(5), std::int64_t(INT64_MIN)}) {
    options o;
    o.ignore_index = ignore;
    CHECK(check(f.p, o) == status::success);
  }
}

TEST_CASE("options outside their domain, enums included, are rejected", "[api][bad-input]") {
  fixture f;
  auto with = [&](auto change) {
    options o;
    change(o);
    return check(f.p, o);
  };
  CHECK(with([](options& o) { o.temperature = NAN; }) == status::invalid_option);
  CHECK(with([](options& o) { o.temperature = -0.f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.temperature = 1e-30f; }) == status::success);
  CHECK(with([](options& o) { o.softcap = INFINITY; }) == status::invalid_option);
  CHECK(with([](options& o) { o.softcap = -1e-30f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.label_smoothing = NAN; }) == status::invalid_option);
  CHECK(with([](options& o) { o.label_smoothing = 1.0000001f; }) == status::invalid_option);
  CHECK(with([](options& o) { o.label_smoothing = 0.f; }) == status::success);
  CHECK(with([](options& o) { o.z_loss = NAN; }) == status::invalid_option);
  CHECK(with([](options& o) {
          o.filter = filter_mode::threshold;
          o.filter_eps = 1.f;
        }) == status::invalid_option);
  // An enum value outside the declared ones would leave outputs unwritten (no reduction to write the loss).
  CHECK(with([](options& o) { o.reduction = cce::reduction(3); }) == status::invalid_option);
  CHECK(with([](options& o) { o.reduction = cce::reduction(-1); }) == status::invalid_option);
  CHECK(with([](options& o) { o.filter = filter_mode(3); }) == status::invalid_option);
  CHECK(with([](options& o) { o.accum = accumulation(2); }) == status::invalid_option);
  CHECK(with([](options& o) { o.backward_mode = cce::backward_mode(4); }) == status::invalid_option);
  CHECK(with([](options& o) { o.backward_mode = cce::backward_mode::loss_and_grad; }) == status::success);
}

TEST_CASE("gradient buffers and architectures are checked on the host", "[api][bad-input]") {
  fixture f;
  const host::tiled_executor<bf16> ex(options{});
  std::vector<bf16> grad_buf(64 * 32 + 8);
  gradients<bf16> g;
  g.ld_dc = 31;  // smaller than D
  CHECK(ex.backward(f.p, {}, g, nullptr, 0, nullptr, 0) == status::invalid_stride);
  g = {};
  g.de = reinterpret_cast<bf16*>(reinterpret_cast<char*>(grad_buf.data()) + 1);
  CHECK(ex.backward(f.p, {}, g, nullptr, 0, nullptr, 0) == status::misaligned_pointer);
  g = {};
  g.db = grad_buf.data();  // a low-rank gradient without the head (rank 0)
  CHECK(ex.backward(f.p, {}, g, nullptr, 0, nullptr, 0) == status::invalid_option);

  // can_implement is host-only: a described device decides, none is needed.
  const linear_cross_entropy<bf16> op{};
  for (int arch : {0, 52, 70, 75}) CHECK(op.can_implement(f.p, device_info{arch, 80}) == status::unsupported_arch);
  for (int arch : {80, 86, 89, 90}) CHECK(op.can_implement(f.p, device_info{arch, 80}) == status::success);
  // On a supported device, argument errors are reported.
  problem<bf16> bad = f.p;
  bad.c = nullptr;
  CHECK(op.can_implement(bad, device_info{90, 132}) == status::null_pointer);
  options hot;
  hot.temperature = 0.f;
  CHECK(linear_cross_entropy<bf16>{hot}.can_implement(f.p, device_info{90, 132}) == status::invalid_option);
  // The element type itself is checked when the functor is instantiated.
  static_assert(!detail::is_supported_element_v<double> && !detail::is_supported_element_v<int>);
  static_assert(detail::is_supported_element_v<float> && detail::is_supported_element_v<__half> &&
                detail::is_supported_element_v<bf16>);
}

TEST_CASE("a too small, null or misaligned workspace is rejected before anything runs", "[api][bad-input]") {
  fixture f;
  const host::tiled_executor<bf16> ex(options{});
  const std::size_t saved = ex.saved_bytes(f.p), work = ex.workspace_bytes(f.p);
  REQUIRE(work > 256);
  std::vector<unsigned char> buf_saved(saved + 512), buf_work(work + 512);
  auto align = [](std::vector<unsigned char>& b) {
    auto a = reinterpret_cast<std::uintptr_t>(b.data());
    return reinterpret_cast<unsigned char*>((a + 255) / 256 * 256);
  };
  float loss = -7.f;
  forward_outputs out;
  out.loss = &loss;
  // The size granted is the budget: below the default it selects a smaller plan, and only a size below the
  // smallest plan (or 0, which asks for the default) is too small.
  CHECK(ex.forward(f.p, out, align(buf_saved), saved, align(buf_work), 1) == status::workspace_too_small);
  CHECK(ex.forward(f.p, out, align(buf_saved), saved, align(buf_work), 0) == status::workspace_too_small);
  CHECK(ex.forward(f.p, out, align(buf_saved), saved, align(buf_work) + 16, work) == status::misaligned_pointer);
  gradients<bf16> g;
  CHECK(ex.backward(f.p, {}, g, align(buf_saved), saved, nullptr, work) == status::null_pointer);
  CHECK(ex.backward(f.p, {}, g, align(buf_saved), saved - 1, align(buf_work), work) == status::workspace_too_small);
  CHECK(loss == -7.f);  // nothing was written
}

TEST_CASE("size queries of an empty problem (N = 0)", "[api][bad-input]") {
  fixture f;
  problem<bf16> p = f.p;
  p.n = 0;
  p.e = nullptr;
  p.targets = nullptr;
  const linear_cross_entropy<bf16> op{};
  const device_info h100{90, 132};
  CHECK(op.can_implement(p, h100) == status::success);
  CHECK(op.saved_bytes(p) > 0);  // the loss normaliser and class-weight total still live there
  CHECK(op.workspace_bytes(p, h100) <= (std::size_t(1) << 20));
  CHECK(op.mode(p, h100, 0) == backward_mode::chunked);
}
