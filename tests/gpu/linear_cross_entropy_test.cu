// The GPU path of cce::linear_cross_entropy against the float64 reference: randomized shapes and options, both
// backward operating points, every element type and gradient type, the benchmark shapes at a reduced token
// count, bitwise determinism and the device-side target check.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include <cce/presets/gemma2.hpp>
#include <cce/presets/gpt2.hpp>
#include <cce/presets/llama3.hpp>
#include <cce/presets/mistral_nemo.hpp>
#include <cce/presets/phi3_5.hpp>
#include <cce/presets/qwen2_5.hpp>

#include "../common/device_case.cuh"
#include "../common/sampled_reference.cuh"
#include "../common/split_budget_check.hpp"

namespace {

using namespace cce;
using test::run_device;

// Randomized cases are held to the rounding bound, the data regimes to the design's relative tolerances.
template <class T, class G>
void run_case(const test::case_config& cfg, std::size_t budget,
              test::gradient_check mode = test::gradient_check::bound) {
  const auto h = test::make_problem<T>(cfg);
  test::check_case<T, G>(h, run_device<T, G>(h, budget), true, mode);
}

}  // namespace

TEST_CASE("GPU matches the float64 reference on randomized cases", "[gpu][random]") {
  std::mt19937_64 rng(4242);
  for (int i = 0; i < 240; ++i) {
    // Mostly small shapes (edge tiles, tiny V, N = 1), some spanning several tiles, vocab splits and chunks.
    test::case_config cfg = i % 5 == 4 ? test::random_config(rng, 700, 300, 3000) : test::random_config(rng, 160, 200, 700);
    cfg.index = i;
    if (!test::case_selected(i)) continue;
    const std::size_t budget = i % 3 == 0 ? 0 : i % 3 == 1 ? 1 : std::size_t(256) << 10;
    cfg.opts.hopper_kernels = (i / 5) % 2 == 0;  // on sm_90a builds, half the cases pin the portable kernels
    switch (i % 5) {
      case 0: run_case<__nv_bfloat16, __nv_bfloat16>(cfg, budget); break;
      case 1: run_case<__nv_bfloat16, float>(cfg, budget); break;
      case 2: run_case<__half, __half>(cfg, budget); break;
      case 3: run_case<float, float>(cfg, budget); break;
      default: run_case<__nv_bfloat16, __nv_bfloat16>(cfg, budget); break;
    }
  }
}

// Problems the Hopper forward takes (16-bit, rows TMA can address: D and the pitches multiples of 8 elements),
// with every option; on other devices or builds they run the portable kernels and check those again.
TEST_CASE("GPU: TMA-addressable problems with every option", "[gpu][hopper]") {
  std::mt19937_64 rng(90);
  for (int i = 0; i < 48; ++i) {
    test::case_config cfg = test::random_config(rng, 600, 300, 3000);
    cfg.d = (cfg.d + 7) / 8 * 8;
    cfg.e_pad = cfg.e_pad ? 8 : 0;
    cfg.c_pad = cfg.c_pad ? 16 : 0;
    const std::size_t budget = i % 2 ? 0 : 1;
    if (i % 3 == 2) run_case<__half, float>(cfg, budget);
    else run_case<__nv_bfloat16, __nv_bfloat16>(cfg, budget);
  }
  test::case_config wide;  // many vocab tiles per split, a ragged last tile and a depth that is not a stage multiple
  wide.n = 200;
  wide.d = 1000;
  wide.v = 20000 + 77;
  wide.bias = true;
  wide.opts.softcap = 30.f;
  wide.seed = 11;
  run_case<__nv_bfloat16, __nv_bfloat16>(wide, 0, test::gradient_check::relative);
  test::case_config tall;  // more tiles than SMs: the dZ kernel's CTAs run across row tiles
  tall.n = 1100;
  tall.d = 136;
  tall.v = 6000 + 13;
  tall.bias = true;
  tall.class_weights = true;
  tall.ignore_fraction = 0.1;
  tall.seed = 12;
  run_case<__nv_bfloat16, float>(tall, 0, test::gradient_check::relative);
  test::case_config chunks;  // chunked over four vocab chunks: dE's fp32 carry stored, added, then read back
  chunks.n = 120;
  chunks.d = 256;
  chunks.v = 3000;
  chunks.bias = true;
  chunks.seed = 13;
  chunks.opts.filter = filter_mode::none;  // the budget below holds the passes' buffers, not the filter's
  const std::size_t four_chunks = std::size_t(320) << 10;
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  using policy = tile::default_policy_t<__nv_bfloat16>;
  const auto pl = detail::make_plan<__nv_bfloat16>(chunks.n, chunks.d, chunks.v, 0, chunks.bias, chunks.opts,
                                                    policy::bm, policy::bn, dev, four_chunks, false, 0,
                                                    policy::forward_ctas_per_sm);
  CHECK(pl.mode == backward_mode::chunked);
  CHECK(pl.chunks(pl.de_pass) == 4);
  run_case<__nv_bfloat16, __nv_bfloat16>(chunks, four_chunks);
}

namespace {

// loss_and_grad with options::backward_mode = loss_and_grad on a TMA-addressable problem: on sm_90a it keeps the
// logits of row blocks (plan_kept_logits), whose count the budget sets; elsewhere it runs forward and backward.
template <class T, class G>
test::case_results run_loss_and_grad_case(test::case_config cfg, std::int64_t block_rows,
                                          test::gradient_check mode = test::gradient_check::bound) {
  cfg.d = (cfg.d + 7) / 8 * 8;
  cfg.e_pad = cfg.e_pad ? 8 : 0;
  cfg.c_pad = cfg.c_pad ? 16 : 0;
  cfg.unit_grad = true;
  cfg.opts.backward_mode = backward_mode::loss_and_grad;
  cfg.opts.vocab_sort = false;
  if (block_rows < cfg.n) cfg.opts.accum = accumulation::fp32;  // Kahan sums plan one block or none
  const auto h = test::make_problem<T>(cfg);
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  const linear_cross_entropy<T> op{cfg.opts};
  const problem<T> p = h.view();
  using policy = tile::default_policy_t<T>;
  auto pl = detail::make_plan<T>(p.n, p.d, p.v, p.lora.rank, cfg.bias, cfg.opts, policy::bm, policy::bn, dev, 0,
                                 cfg.class_weights, 0, policy::forward_ctas_per_sm);
  std::size_t budget = 0;  // the default (1 GiB) holds one block of these sizes
  if (pl.kept_rows > 0 && block_rows < cfg.n) {  // the budget of blocks of block_rows, which the plan evens out
    pl.kept_rows = block_rows;
    pl.template carve_kept<T>(nullptr, &budget);
    pl = detail::make_plan<T>(p.n, p.d, p.v, p.lora.rank, cfg.bias, cfg.opts, policy::bm, policy::bn, dev, budget,
                              cfg.class_weights, 0, policy::forward_ctas_per_sm);
    CHECK(pl.kept_rows < cfg.n);
  }
  const bool kept = pl.kept_rows > 0 && detail::sm90::available(p, pl, dev, cfg.opts);
  const std::int64_t blocks = kept ? (cfg.n + pl.kept_rows - 1) / pl.kept_rows : 1;
  cfg.extra_class_roundings += kept ? blocks - 1 : 0;  // beyond the caller's
  test::host_problem<T> hk = h;
  hk.cfg = cfg;
  const test::device_case<T, G> dc(hk, budget);
  INFO(cfg.describe() << " | row blocks " << blocks << (kept ? " (logits kept)" : ""));
  CHECK((dc.op().mode(dc.device_view(), dev, dc.workspace_bytes()) == backward_mode::loss_and_grad) == kept);
  dc.reset();
  REQUIRE(dc.loss_and_grad() == status::success);
  const test::case_results r = dc.results();
  test::check_case<T, G>(hk, r, true, mode);
  return r;
}

}  // namespace

// Every option through the logit-keeping loss_and_grad: one row block, and (N past 1,024 rows, a budget for blocks of
// 1,024) two or three with a ragged last one, where dC and dBias are added to the output block by block.
TEST_CASE("GPU: loss_and_grad keeping the logits of row blocks", "[gpu][kept]") {
  std::mt19937_64 rng(77);
  for (int i = 0; i < 36; ++i) {
    test::case_config cfg = test::random_config(rng, 600, 200, 3000);
    cfg.index = i;
    if (!test::case_selected(i)) continue;
    std::int64_t block_rows = cfg.n;
    if (i % 3 == 2) {  // two or three blocks of 1,024 rows
      cfg.n = 1024 + 1 + std::int64_t(rng() % 1800);
      if (cfg.seq_len) cfg.n = cfg.n / cfg.seq_len * cfg.seq_len;
      cfg.v = std::min<std::int64_t>(cfg.v, 1500);
      block_rows = 1024;
    }
    switch (i % 4) {
      case 0: run_loss_and_grad_case<__nv_bfloat16, __nv_bfloat16>(cfg, block_rows); break;
      case 1: run_loss_and_grad_case<__nv_bfloat16, float>(cfg, block_rows); break;
      case 2: run_loss_and_grad_case<__half, __half>(cfg, block_rows); break;
      default: run_loss_and_grad_case<__nv_bfloat16, __nv_bfloat16>(cfg, block_rows); break;
    }
  }
}

// The Hopper forward's clusters that share classifier stages, checked in float64 on the device: with long runs of
// class tiles per CTA (8,317 rows: 65 row tiles, so that one CTA pads the grid), and with short runs on an even number
// of row tiles (2,048 rows, 768 deep, more units than resident clusters, so that each cluster walks several).
TEST_CASE("GPU: forward clusters sharing the classifier", "[gpu][hopper]") {
  using policy = tile::default_policy_t<__nv_bfloat16>;
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  const std::pair<test::sampled_shape, bool> cases[] = {{{8317, 4096, 70000, "clustered, long runs"}, true},
                                                        {{2048, 768, 50304, "clustered, short runs"}, false}};
  for (const auto& [s, long_runs] : cases) {
    const auto pl = detail::make_plan<__nv_bfloat16>(s.n, s.d, s.v, 0, false, options{}, policy::bm, policy::bn, dev,
                                                      0, false, 0, policy::forward_ctas_per_sm);
    CHECK(detail::sm90::shares_classifier(pl.grid.row_tiles(), s.v, s.d, pl.splits));
    CHECK(detail::sm90::long_class_runs(s.v, s.d, pl.splits) == long_runs);
    test::run_sampled_case<policy>(s, options{}, 0);
  }
}

namespace {

template <bool Series>
__global__ void softcap_kernel(const float* raw, int count, logit_transform t, float* out) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < count) out[i] = detail::softcap_approx<Series>(t)(raw[i]);
}

}  // namespace

// The kernels' softcap against tanh in float64 at raw logits from 1e-8 to 2e3, held to u(fp32) = 1e-6 as the tests'
// tolerances are (docs/testing.md): the fast form (16-bit inputs) in absolute terms, in units of k / T; the form
// with the series near 0 (fp32 inputs) relative to the value. Without the series the cancellation in 1 - 2^(-2|y|)
// cost an fp32 problem with V = 1 a relative error of 5e-4 in its lse.
TEST_CASE("GPU: the kernels' softcap is tanh within fp32's unit roundoff", "[gpu][softcap]") {
  std::vector<float> raw{0.f};
  for (double m = 1e-8; m < 2e3; m *= 1.07) {
    raw.push_back(float(m));
    raw.push_back(float(-m));
  }
  for (bool series : {false, true}) {
    for (float cap : {30.f, 5.f}) {
      for (float inv_t : {1.f, 1.f / 0.7f}) {
        const logit_transform t{cap, inv_t};
        test::device_vector<float> in(raw), out(raw.size());
        const unsigned blocks = unsigned((raw.size() + 255) / 256);
        if (series) softcap_kernel<true><<<blocks, 256>>>(in.ptr, int(raw.size()), t, out.ptr);
        else softcap_kernel<false><<<blocks, 256>>>(in.ptr, int(raw.size()), t, out.ptr);
        REQUIRE_CUDA(cudaGetLastError());
        const std::vector<float> got = out.download();
        double worst = 0.0;
        for (std::size_t i = 0; i < raw.size(); ++i) {
          const double want = double(cap) * std::tanh(double(raw[i]) / double(cap)) * double(inv_t);
          const double scale = series ? std::abs(want) : double(cap) * double(inv_t);
          if (want != 0.0) worst = std::max(worst, std::abs(double(got[i]) - want) / scale);
          else CHECK(got[i] == 0.f);
        }
        INFO("series " << series << ", softcap " << cap << ", 1/T " << inv_t);
        CHECK(worst <= 1e-6);
      }
    }
  }
}

// Where the softcap saturates it gives k / T exactly, with the sign of the input (logit_derivative's zero gradient
// at infinite inputs relies on it), and a NaN stays NaN.
TEST_CASE("GPU: the kernels' softcap saturates exactly and keeps NaN", "[gpu][softcap]") {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> raw{inf, -inf, 1e30f, -1e30f, std::numeric_limits<float>::quiet_NaN()};
  for (bool series : {false, true}) {
    const logit_transform t{30.f, 1.f / 0.7f};
    test::device_vector<float> in(raw), out(raw.size());
    if (series) softcap_kernel<true><<<1, 32>>>(in.ptr, int(raw.size()), t, out.ptr);
    else softcap_kernel<false><<<1, 32>>>(in.ptr, int(raw.size()), t, out.ptr);
    REQUIRE_CUDA(cudaGetLastError());
    const std::vector<float> got = out.download();
    const float s = t.softcap * t.inv_temperature;
    INFO("series " << series);
    CHECK(got[0] == s);
    CHECK(got[1] == -s);
    CHECK(got[2] == s);
    CHECK(got[3] == -s);
    CHECK(std::isnan(got[4]));
  }
}

// Softcapped logits far below zero, where each weight exp(z - k / T) lies near e^(-2 k / T), alone and beside
// classes near the cap: at k / T = 40 the forward folds them against the cap (capped_softmax); at 50, past its bound,
// against each row's max (against the cap, these weights would flush to zero and the rows' sums with them).
TEST_CASE("GPU: softcapped logits far from zero", "[gpu][softcap]") {
  for (float cap : {40.f, 50.f})
    for (bool mixed : {false, true}) {
      test::case_config cfg;
      cfg.n = 300;
      cfg.d = 128;
      cfg.v = 2000 + 5;
      cfg.bias = true;
      cfg.opts.softcap = cap;
      cfg.seed = 21;
      auto h = test::make_problem<__nv_bfloat16>(cfg);
      for (std::size_t j = 0; j < h.bias.size(); ++j)
        h.bias[j] = __float2bfloat16(mixed && j % 7 == 0 ? 90.f : -90.f - float(j % 13));
      INFO("softcap " << cap << (mixed ? ", some classes near the cap" : ", every class far below zero"));
      test::check_case<__nv_bfloat16, __nv_bfloat16>(h, run_device<__nv_bfloat16, __nv_bfloat16>(h, 0), true);
    }
}

// The sm_90a kernels hold 128 fp32 accumulators per consumer thread: a change that makes the compiler spill them (as a
// branch around the mainloop once did, costing the forward 5 to 13 %) fails here rather than in a benchmark.
TEST_CASE("GPU: the sm_90a kernels keep their state in registers", "[gpu][hopper]") {
  const std::vector<std::size_t> local = test::sm90_local_bytes();
  if (local.empty()) {
    WARN("no sm_90a device and image: nothing to check");
    return;
  }
  REQUIRE(local.size() == 7);  // forward (both forms), dlogit, dE and dC products, persistent products (both grad types)
  for (std::size_t bytes : local) CHECK(bytes == 0);
}

// The default 16-bit policy's forward takes 96 KiB of stages and, only for label smoothing or the argmax, 1.5 KiB of
// per-row state beside them: it fits the 99 KiB per CTA of sm_86 and sm_89 either way.
TEST_CASE("GPU: the portable forward fits an sm_86 / sm_89 CTA", "[gpu][smem]") {
  using bf16 = __nv_bfloat16;
  using policy = tile::default_policy_t<bf16>;
  const cudaFuncAttributes attr = test::portable_forward_attributes();
  REQUIRE(attr.maxThreadsPerBlock > 0);  // the build has an image of the kernel for this device
  constexpr std::size_t per_cta = 99 * 1024;
  CHECK(attr.sharedSizeBytes + detail::forward_smem_bytes<bf16, policy>(false) <= per_cta);
  CHECK(attr.sharedSizeBytes + detail::forward_smem_bytes<bf16, policy>(true) <= per_cta);
}

TEST_CASE("GPU: every data regime at a size with many tiles", "[gpu][regimes]") {
  for (auto data : {test::regime::lm_like, test::regime::uniform, test::regime::peaked}) {
    for (bool exact : {true, false}) {
      for (bool hopper : {true, false}) {
        test::case_config cfg;
        cfg.n = 300;
        cfg.d = 256;
        cfg.v = 2000;
        cfg.data = data;
        cfg.seed = 7 + int(data);
        // On peaked data the filter leaves 256-class tiles with one live 128-class half: their bias column sums.
        cfg.bias = data == test::regime::peaked;
        cfg.opts = exact ? options::exact() : options{};
        cfg.opts.hopper_kernels = hopper;
        run_case<__nv_bfloat16, __nv_bfloat16>(cfg, 0, test::gradient_check::relative);
        run_case<__nv_bfloat16, __nv_bfloat16>(cfg, 1, test::gradient_check::relative);
      }
    }
  }
}

// Near-uniform rows take the baseline 1/V (options::uniform_tolerance = 1/16, which the uniform data meets): every
// tile without a target is skipped, in both operating points on both kernel paths, and the baseline's share is
// added back (dE, dC, dBias), with and without a softcap (whose factor scales the draws, not the baseline; its rows
// qualify at 3/4 of the tolerance, so there 1/8, above the bias's spread). The logit-keeping loss_and_grad adds it
// per row block (two blocks here), the classifier's column sums once.
TEST_CASE("GPU: near-uniform rows take a baseline and skip their other tiles", "[gpu][baseline]") {
  for (bool hopper : {true, false}) {
    for (std::size_t budget : {std::size_t(0), std::size_t(1)}) {
      for (float softcap : {0.f, 30.f}) {
        test::case_config cfg;
        cfg.n = 200;
        cfg.d = 256;
        cfg.v = 32000;
        cfg.data = test::regime::uniform;
        cfg.seed = 19;
        cfg.bias = true;
        cfg.opts.uniform_tolerance = softcap > 0.f ? 1.f / 8 : 1.f / 16;
        cfg.opts.hopper_kernels = hopper;
        cfg.opts.softcap = softcap;
        INFO("hopper " << hopper << " budget " << budget << " softcap " << softcap);
        const auto h = test::make_problem<__nv_bfloat16>(cfg);
        const test::case_results r = run_device<__nv_bfloat16, __nv_bfloat16>(h, budget);
        test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::relative);
        // 2 row tiles x 250 class tiles of 128; the 200 targets lie in at most 200 of them.
        CHECK(r.filter_tiles[0] + r.filter_tiles[1] == 2 * 250);
        CHECK(r.filter_tiles[0] <= 200);
      }
    }
  }
  for (float softcap : {0.f, 30.f}) {
    test::case_config cfg;
    cfg.n = 1500;
    cfg.d = 128;
    cfg.v = 6000;
    cfg.data = test::regime::uniform;
    cfg.seed = 23;
    cfg.bias = true;
    cfg.class_weights = softcap == 0.f;  // the general draw; with the softcap the common one
    cfg.opts.uniform_tolerance = softcap > 0.f ? 1.f / 8 : 1.f / 16;
    cfg.opts.softcap = softcap;
    INFO("softcap " << softcap);
    const test::case_results r =
        run_loss_and_grad_case<__nv_bfloat16, __nv_bfloat16>(cfg, 1024, test::gradient_check::relative);
    CHECK(r.filter_tiles[1] > 0);  // most of the 47 class tiles hold a target of each 128-row tile; not all
  }
}

// Rows near-uniform to first order (no bias): logits a tenth from flat at uniform_tolerance 1/16, whose first-order
// share is a tenth of the gradient, and the benchmark's uniform data at the default tolerance. Every tile is skipped
// and the share, then the rows' one-hot terms (a gathered row of C into dE, the class's rows of E into dC) are added
// after the walk (two more roundings of dE and dC), on both kernel paths: chunked, minimal at the least budget that
// plans it (N = 300, D = 1,024: its D x D matrix then leaves room for slabs narrower than D), with accumulating
// gradients (minimal's two passes), fp32 gradients, a D that TMA cannot address (the portable products), a softcap,
// and loss_and_grad over two row blocks with class weights. With every third row of the first row tile far from
// flat (sharp_rows), that tile's classes are computed with the first-order draws of the other rows in them: without
// and with a softcap, and in loss_and_grad's logit-keeping path. At N = 600 (N >= 2 D) the sm_90a path sums C^T C
// in two halves of the vocabulary onto one carry and the rows' Gram matrix in two halves of the rows, at N = 1,200
// each in four parts onto two carries.
TEST_CASE("GPU: rows near-uniform to first order skip every tile", "[gpu][baseline]") {
  using policy = tile::default_policy_t<__nv_bfloat16>;
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  for (bool hopper : {true, false}) {
    for (int variant = 0; variant < 10; ++variant) {
      test::case_config cfg;
      const bool minimal = variant == 1 || variant == 2, mixed = variant == 6 || variant == 7;
      // Variants 8 and 9: N >= 2 D, so that fp32 sums of C^T C in parts fit in the slab's place (sm_90a): one, two.
      cfg.n = minimal ? 300 : variant == 8 ? 600 : variant == 9 ? 1200 : 200;
      cfg.d = variant == 4 ? 97 : minimal ? 1024 : 256;
      cfg.v = minimal ? 8000 : 16000;
      cfg.data = variant == 5 || variant == 7 ? test::regime::uniform : test::regime::near_flat;
      cfg.seed = 29 + variant;
      if (variant != 5 && variant != 7) cfg.opts.uniform_tolerance = 1.f / 16;
      cfg.opts.softcap = variant == 3 || variant == 7 ? 30.f : 0.f;
      cfg.sharp_rows = mixed ? 128 : 0;
      cfg.opts.hopper_kernels = hopper;
      cfg.opts.accumulate = variant == 2;
      cfg.extra_row_roundings = cfg.extra_class_roundings = 2;
      std::size_t budget = 0;
      if (minimal) {  // at the least budget (in 16 KiB steps) that plans the products
        cfg.opts.backward_mode = backward_mode::minimal;
        auto make = [&](std::size_t b) {
          return detail::make_plan<__nv_bfloat16>(cfg.n, cfg.d, cfg.v, 0, false, cfg.opts, policy::bm, policy::bn, dev,
                                                  b, false, 0, policy::forward_ctas_per_sm);
        };
        // What the call plans: from the workspace the size query reports.
        auto plan = [&] { return make(make(budget).workspace_bytes<__nv_bfloat16>()); };
        for (budget = std::size_t(16) << 10; budget < (std::size_t(64) << 20); budget += std::size_t(16) << 10)
          if (plan().linear() && plan().mode == backward_mode::minimal && (variant == 2 || plan().carried_pass.cols))
            break;
        INFO("slab " << plan().linear_slab_cols);
        CHECK(plan().linear());
        CHECK(plan().linear_slab_cols < cfg.d);
        CHECK((plan().carried_pass.cols > 0) == (variant == 1));
      }
      INFO("hopper " << hopper << " variant " << variant << " budget " << budget);
      const auto h = test::make_problem<__nv_bfloat16>(cfg);
      const test::case_results r = run_device<__nv_bfloat16, __nv_bfloat16>(h, budget);
      test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::relative);
      // Every row takes the baseline and leaves its one-hot term to after the walk: no tile is computed (but the
      // first row tile's where it holds sharp rows).
      const std::int64_t col_tiles = (cfg.v + 127) / 128, row_tiles = (cfg.n + 127) / 128;
      CHECK(r.filter_tiles[0] == (mixed ? col_tiles : 0));
      CHECK(r.filter_tiles[1] == (mixed ? row_tiles - 1 : row_tiles) * col_tiles);
      if (variant == 0) {
        const test::case_results f = run_device<__nv_bfloat16, float>(h, budget);
        test::check_case<__nv_bfloat16, float>(h, f, true, test::gradient_check::relative);
      }
    }
  }
  for (bool mixed : {false, true}) {
    test::case_config cfg;
    cfg.n = 1500;
    cfg.d = 128;
    cfg.v = 6000;
    cfg.data = test::regime::near_flat;
    cfg.seed = 37;
    cfg.class_weights = !mixed;  // the general draw; mixed, the common one with a softcap
    cfg.opts.softcap = mixed ? 30.f : 0.f;
    cfg.sharp_rows = mixed ? 128 : 0;
    cfg.opts.uniform_tolerance = 1.f / 16;
    cfg.extra_row_roundings = cfg.extra_class_roundings = 2;
    const test::case_results r =
        run_loss_and_grad_case<__nv_bfloat16, __nv_bfloat16>(cfg, 1024, test::gradient_check::relative);
    CHECK(r.filter_tiles[0] == (mixed ? 47 : 0));
  }
}

// Lone targets (kernel/portable/lone_targets.cuh): on peaked data at D = 1,024 (dominant logits of 32 against N(0, 1))
// with no target on its row's own class, the walk computes only the 3 tiles that hold the 300 rows' dominant classes
// and skips their target tiles, whose terms are added after it (one more rounding of dE and dC). On both kernel
// paths: chunked, minimal, fp32 gradients, a softcap of 5 at T = 0.05 (dominant logits of 100; the target's factor
// dz/draw, 0.7 to 1 over the targets' logits, is not left out of their terms), class weights; and loss_and_grad over
// two row blocks, 12 row tiles of 47 class tiles.
TEST_CASE("GPU: lone targets skip their tiles", "[gpu][baseline]") {
  for (bool hopper : {true, false}) {
    for (int variant = 0; variant < 4; ++variant) {
      test::case_config cfg;
      cfg.n = 300;
      cfg.d = 1024;
      cfg.v = 8000;
      cfg.data = test::regime::peaked;
      cfg.targets_off_peak = true;
      cfg.seed = 43 + variant;
      cfg.opts.hopper_kernels = hopper;
      if (variant == 1) cfg.opts.backward_mode = backward_mode::minimal;
      cfg.opts.softcap = variant == 2 ? 5.f : 0.f;
      cfg.opts.temperature = variant == 2 ? 0.05f : 1.f;
      cfg.class_weights = variant == 3;
      cfg.extra_row_roundings = cfg.extra_class_roundings = 1;
      INFO("hopper " << hopper << " variant " << variant);
      const auto h = test::make_problem<__nv_bfloat16>(cfg);
      const test::case_results r = run_device<__nv_bfloat16, __nv_bfloat16>(h, 0);
      test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::relative);
      CHECK(r.filter_tiles[0] == 3);
      CHECK(r.filter_tiles[1] == 3 * 63 - 3);
      if (variant == 0) {
        const test::case_results f = run_device<__nv_bfloat16, float>(h, 0);
        test::check_case<__nv_bfloat16, float>(h, f, true, test::gradient_check::relative);
      }
    }
  }
  test::case_config cfg;
  cfg.n = 1500;
  cfg.d = 1024;
  cfg.v = 6000;
  cfg.data = test::regime::peaked;
  cfg.targets_off_peak = true;
  cfg.seed = 47;
  cfg.extra_row_roundings = cfg.extra_class_roundings = 1;
  const test::case_results r =
      run_loss_and_grad_case<__nv_bfloat16, __nv_bfloat16>(cfg, 1024, test::gradient_check::relative);
  CHECK(r.filter_tiles[0] == 12);
}

// The split budget (kernel/portable/split_skip.cuh) on the benchmark's gpt2 peaked data at V = 16,000: at D = 768 a
// softcap of 30 holds the dominant logits near 21.8 against N(0, 1) elsewhere, where the tile maxima (about 4.3 over
// 128 x 128) keep the other tiles (checked on the inputs against the rows' lse, which bounds their non-target one
// from above). The walk computes only tiles of the splits that hold a row tile's dominant classes (two per row tile
// at most), the target tiles elsewhere leaving their terms to after it: on both kernel paths, chunked and minimal,
// and in loss_and_grad over two row blocks. The saved budget keeps every row's drop under eps (checked in float64).
namespace {

// What the finaliser computes per row from the partials merged by split_rows::read (a thread per row, in split order).
__global__ void finalise_rows_by_read(detail::split_rows rows, std::int64_t n, detail::target_reader labels,
                                      loss_terms terms, float* lse, float* loss, std::uint8_t* correct) {
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  const detail::row_label lab = labels(row);
  const bool kept = lab.kind == detail::row_label::kept;
  row_partial p;
  float target_logit = 0.f;
  rows.read(row, kept ? lab.target : -1, p, target_logit);
  const row_result r = finalise_row(p, lab, target_logit, kept ? 1.f : 0.f, terms);
  lse[row] = r.lse;
  loss[row] = r.loss;
  correct[row] = r.correct;
}

}  // namespace

// The finaliser stages each block's split partials through shared memory, four splits at a time: its rows' results
// equal those of split_rows::read's merge on the device bit for bit, for split counts on both sides of the chunk and
// not multiples of it, empty partials (splits without tiles), ignored rows and a ragged last block.
TEST_CASE("GPU: the finaliser merges split partials in split order", "[gpu][finaliser]") {
  constexpr int threads = detail::plan::finalise_threads;
  std::mt19937_64 rng(77);
  std::uniform_real_distribution<float> uniform(-4.f, 4.f);
  for (const std::int64_t splits : {1, 3, 4, 5, 33, 35}) {
    const std::int64_t n = 2 * threads + 37, v = 5000;
    std::vector<row_partial> partials(static_cast<std::size_t>(n * splits));
    for (row_partial& q : partials) {
      if (rng() % 7 == 0) continue;  // empty
      q.softmax = {uniform(rng), 1.f + std::abs(uniform(rng)), uniform(rng)};
      q.weighted_logit_sum = uniform(rng);
      q.argmax_value = uniform(rng);
      q.argmax_index = std::int32_t(rng() % v);
    }
    const std::size_t rows = static_cast<std::size_t>(n);
    std::vector<float> target_logit(rows);
    std::vector<std::int64_t> targets(rows);
    for (std::int64_t r = 0; r < n; ++r) {
      target_logit[std::size_t(r)] = uniform(rng);
      targets[std::size_t(r)] = r % 11 == 0 ? -100 : std::int64_t(rng() % v);
    }
    const test::device_vector<row_partial> d_partials(partials);
    const test::device_vector<float> d_target_logit(target_logit);
    const test::device_vector<std::int64_t> d_targets(targets);
    detail::finalise_params<detail::split_rows> prm;
    prm.rows = {d_partials.ptr, splits, d_target_logit.ptr};
    prm.n = n;
    prm.labels.targets = d_targets.ptr;
    prm.labels.classes = prm.labels.columns = v;
    prm.weight_total = {nullptr, float(v)};
    prm.inv_classes = 1.f / float(v);
    prm.smoothing = 0.1f;
    prm.z_loss = 1e-3f;
    prm.reduction = reduction::none;
    const std::size_t blocks = static_cast<std::size_t>(detail::ceil_div(n, std::int64_t(threads)));
    const test::device_vector<float> lse(rows), lse_others(rows), loss(rows), sums(2 * blocks), ref_lse(rows),
        ref_loss(rows);
    const test::device_vector<std::uint8_t> correct(rows), ref_correct(rows);
    prm.lse_saved = lse.ptr;
    prm.lse_others_saved = lse_others.ptr;
    prm.out.loss = loss.ptr;
    prm.out.correct = correct.ptr;
    prm.block_sums = sums.ptr;
    detail::finalise_kernel<threads, detail::split_rows><<<unsigned(blocks), threads>>>(prm);
    const loss_terms terms{prm.smoothing, prm.z_loss, prm.inv_classes, float(v)};
    finalise_rows_by_read<<<unsigned(detail::ceil_div(n, std::int64_t(128))), 128>>>(
        prm.rows, n, prm.labels, terms, ref_lse.ptr, ref_loss.ptr, ref_correct.ptr);
    REQUIRE_CUDA(cudaDeviceSynchronize());
    INFO("splits " << splits);
    CHECK(test::bitwise_equal(lse.download(), ref_lse.download()));
    CHECK(test::bitwise_equal(loss.download(), ref_loss.download()));
    CHECK(correct.download() == ref_correct.download());
  }
}

TEST_CASE("GPU: splits whose share of the mass is negligible skip their tiles", "[gpu][filter]") {
  using policy = tile::default_policy_t<__nv_bfloat16>;
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  test::case_config cfg;
  cfg.n = 512;
  cfg.d = 768;
  cfg.v = 16000;
  cfg.data = test::regime::peaked;
  cfg.targets_off_peak = true;
  cfg.seed = 53;
  cfg.opts.softcap = 30.f;
  cfg.extra_row_roundings = cfg.extra_class_roundings = 1;  // the lone targets' terms
  const detail::plan pl = detail::make_plan<__nv_bfloat16>(cfg.n, cfg.d, cfg.v, 0, false, cfg.opts, policy::bm,
                                                           policy::bn, dev, 0, false, 0, policy::forward_ctas_per_sm);
  const tile::tile_grid& g = pl.grid;
  // Filter tiles of the widest split (of 256-class units, the widest any forward takes), two splits per row tile.
  const std::int64_t most = g.row_tiles() * 2 * 2 * detail::ceil_div(detail::ceil_div(cfg.v, 256), pl.splits);
  INFO("splits " << pl.splits << ", at most " << most << " of " << g.tiles() << " tiles");
  REQUIRE(most < g.tiles() / 4);
  for (bool hopper : {true, false}) {
    for (bool minimal : {false, true}) {
      cfg.opts.hopper_kernels = hopper;
      cfg.opts.backward_mode = minimal ? backward_mode::minimal : backward_mode::chunked;
      INFO("hopper " << hopper << " minimal " << minimal);
      const auto h = test::make_problem<__nv_bfloat16>(cfg);
      const test::device_case<__nv_bfloat16, __nv_bfloat16> dcase(h, 0);
      dcase.reset();
      REQUIRE(dcase.forward() == status::success);
      REQUIRE(dcase.backward() == status::success);
      const test::case_results r = dcase.results();
      test::check_case<__nv_bfloat16, __nv_bfloat16>(h, r, true, test::gradient_check::relative);
      CHECK(r.filter_tiles[0] <= most);
      CHECK(r.filter_tiles[0] + r.filter_tiles[1] == g.tiles());
      if (minimal) continue;
      std::vector<unsigned char> saved(dcase.saved_bytes());
      REQUIRE_CUDA(cudaMemcpy(saved.data(), dcase.saved(), saved.size(), cudaMemcpyDeviceToHost));
      CHECK(test::check_split_budget(h, pl, pl.carve_saved(saved.data())) >= g.tiles() - most);
      if (hopper) continue;
      // The first row tile against the last class tile: its maximum over the rows' lse, above the filter's bound.
      double tile_max = -INFINITY, lse = INFINITY;
      for (std::int64_t row = 0; row < g.bm; ++row) {
        lse = std::min(lse, double(r.lse[std::size_t(row)]));
        for (std::int64_t col = g.col_begin(g.col_tiles() - 1); col < cfg.v; ++col) {
          double raw = 0.0;
          for (std::int64_t k = 0; k < cfg.d; ++k)
            raw += double(detail::to_float(h.e[std::size_t(row * cfg.d + k)])) *
                   double(detail::to_float(h.c[std::size_t(col * cfg.d + k)]));
          tile_max = std::max(tile_max, 30.0 * std::tanh(raw / 30.0));
        }
      }
      const auto f =
          filter::mass_threshold::make(filter::eps_of<__nv_bfloat16>(cfg.opts), g.bn, detail::filter_tiles(g, cfg.v));
      INFO("log p_max " << tile_max - lse << ", threshold " << f.log_threshold);
      CHECK_FALSE(f.skip(float(tile_max - lse)));
    }
  }
  cfg.opts.hopper_kernels = true;
  cfg.opts.backward_mode = backward_mode::chunked;
  const test::case_results r =
      run_loss_and_grad_case<__nv_bfloat16, __nv_bfloat16>(cfg, 256, test::gradient_check::relative);
  CHECK(r.filter_tiles[0] <= most);
}

// Minimal mode's two passes take their own blocks: over a range of budgets the plans carry dE across chunks, carry
// dC across row blocks, or hold all rows in one dC block; each distinct plan is checked on both kernel paths.
TEST_CASE("GPU: minimal's passes at many budgets", "[gpu][minimal]") {
  using policy = tile::default_policy_t<__nv_bfloat16>;
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  // Without a bias the sm_90a walk reads its tile flags from one launch (plan::walk_flags) at each block's offset:
  // on peaked data, where the filter skips most tiles.
  for (bool bias : {true, false}) {
    test::case_config cfg;
    cfg.n = 1500;
    cfg.d = 128;
    cfg.v = 2000;
    cfg.bias = bias;
    cfg.data = bias ? test::regime::lm_like : test::regime::peaked;
    cfg.opts.backward_mode = backward_mode::minimal;
    int checked[2][2] = {};  // plans checked, by (dE carried, dC carried)
    detail::pass_shape last_de{}, last_dc{};
    for (std::size_t budget = std::size_t(256) << 10; budget <= (std::size_t(16) << 20);
         budget += std::size_t(128) << 10) {
      const auto pl = detail::make_plan<__nv_bfloat16>(cfg.n, cfg.d, cfg.v, 0, bias, cfg.opts, policy::bm, policy::bn,
                                                        dev, budget, false, 0, policy::forward_ctas_per_sm);
      if (pl.mode != backward_mode::minimal || pl.workspace_bytes<__nv_bfloat16>() > budget) continue;
      if (pl.de_pass == last_de && pl.dc_pass == last_dc) continue;
      last_de = pl.de_pass;
      last_dc = pl.dc_pass;
      int& kind = checked[pl.chunks(pl.de_pass) > 1][pl.row_blocks(pl.dc_pass) > 1];
      if (kind == 3) continue;
      ++kind;
      INFO("bias " << bias << ", budget " << budget << ": dE pass " << pl.de_pass.rows << " x " << pl.de_pass.cols
                   << ", dC pass " << pl.dc_pass.rows << " x " << pl.dc_pass.cols);
      cfg.seed = std::uint64_t(budget);
      cfg.opts.hopper_kernels = kind % 2 == 1;
      run_case<__nv_bfloat16, __nv_bfloat16>(cfg, budget, test::gradient_check::relative);
    }
    CHECK(checked[1][0] + checked[1][1] > 0);  // dE carried across chunks
    CHECK(checked[0][1] + checked[1][1] > 0);  // dC carried across row blocks
    CHECK(checked[0][0] + checked[1][0] > 0);  // all rows in one dC block
  }
}

// Minimal's carried pass (dispatch/plan.hpp): dE's fp32 carry (and its compensation) in dC's buffer, the chunks
// under it walked last, all but the last recomputed for dC. At the first budget of a range that plans it (D is wide so
// that narrow chunks give dC_chunk a tile per SM): the default filter with a bias on both kernel paths, Kahan sums on
// the sm_90a one, fp32 gradients on the portable one, exact mode on both, run twice and compared bitwise, and chunks
// narrower than the rows, whose dC tiles run deeper than dE's and come first in the persistent products' queue. On
// the sm_90a path the carry of 16-bit gradients without compensation shares dE's buffer (plan::carry_shares_de).
TEST_CASE("GPU: minimal's carried pass", "[gpu][minimal]") {
  using policy = tile::default_policy_t<__nv_bfloat16>;
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  for (int variant = 0; variant < 5; ++variant) {
    test::case_config cfg;
    cfg.n = variant == 4 ? 1400 : 200;
    cfg.d = 2048;
    cfg.v = variant == 4 ? 6000 + 7 : 4000 + 7;
    cfg.bias = true;
    cfg.seed = 60 + std::uint64_t(variant);
    cfg.opts = variant == 3 ? options::exact() : options{};
    cfg.opts.backward_mode = backward_mode::minimal;
    if (variant == 1) cfg.opts.accum = accumulation::kahan;
    INFO(cfg.describe());
    std::size_t budget = 0;
    std::int64_t chunk_cols = 0, under = 0, under_shared = 0;
    for (std::size_t b = std::size_t(1) << 20; b <= (std::size_t(8) << 20); b += std::size_t(64) << 10) {
      const auto pl = detail::make_plan<__nv_bfloat16>(cfg.n, cfg.d, cfg.v, 0, true, cfg.opts, policy::bm, policy::bn,
                                                        dev, b, false, 0, policy::forward_ctas_per_sm);
      if (pl.mode == backward_mode::minimal && pl.carried_pass.cols > 0 && pl.workspace_bytes<__nv_bfloat16>() <= b) {
        budget = b;
        chunk_cols = pl.carried_pass.cols;
        under = pl.chunks_under_carry;
        under_shared = pl.chunks_under_shared_carry;
        break;
      }
    }
    REQUIRE(budget > 0);
    if (variant == 4) CHECK(chunk_cols < cfg.n);
    // Where the carry may share dE's buffer (no compensation), no more chunks lie under the half left in dC (one
    // at N = 200), fewer where the rows span several chunks.
    if (variant == 1) {
      CHECK(under_shared == 0);
    } else {
      CHECK(under_shared > 0);
      CHECK(under_shared <= under);
      if (variant == 4) CHECK(under_shared < under);
    }
    for (bool hopper : {true, false}) {
      cfg.opts.hopper_kernels = hopper;
      if (variant == 0) run_case<__nv_bfloat16, __nv_bfloat16>(cfg, budget);
      if (variant == 1 && hopper) run_case<__nv_bfloat16, __nv_bfloat16>(cfg, budget);
      if (variant == 2 && !hopper) run_case<__nv_bfloat16, float>(cfg, budget);
      if (variant == 4) run_case<__nv_bfloat16, __nv_bfloat16>(cfg, budget);
      if (variant == 3) {
        const auto h = test::make_problem<__nv_bfloat16>(cfg);
        const auto first = run_device<__nv_bfloat16, __nv_bfloat16>(h, budget);
        if (hopper) test::check_case<__nv_bfloat16, __nv_bfloat16>(h, first, true, test::gradient_check::bound);
        const auto again = run_device<__nv_bfloat16, __nv_bfloat16>(h, budget);
        CHECK(again.de == first.de);
        CHECK(again.dc == first.dc);
        CHECK(again.dbias == first.dbias);
      }
    }
  }
}

// The compacted walk (dispatch/plan.hpp, compact_walk_buffers), where the sm_90a walk reads one set of flags: the
// state it leaves in the workspace says which walk ran. Odd N and V put rows past N and classes past V in the
// slots. The default budgets hold every live tile: all of them where 128 divides N (a slot takes 128 rows), the few
// of peaked data at D = 512 otherwise (a row's own class dominates); the chunk walk runs where a budget leaves fewer
// slots than live tiles (no filter: every tile is live). With the embeddings of row tile 0 scaled down, its rows'
// own classes no longer dominate and every tile of that row tile is live, beside a tile or so in each other row tile
// (as gpt2's peaked data has it): its dE runs in parts whose fp32 sums are added after the products.
TEST_CASE("GPU: the compacted walk where the live tiles fit and the chunk walk where not", "[gpu][compact]") {
  using T = __nv_bfloat16;
  using policy = tile::default_policy_t<T>;
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  if (dev.arch != 90) {
    WARN("the compacted walk runs on sm_90a only");
    return;
  }
  struct variant {
    test::regime data;
    backward_mode mode;
    std::size_t budget;  // 0: the mode's default, which holds every live tile here
    bool filter, accumulate, fp32_gradients;
    std::int64_t n, d, v;
    bool weak_first_rows;
  };
  const variant variants[] = {
      {test::regime::peaked, backward_mode::minimal, 0, true, false, false, 1000 + 3, 512, 3000 + 1, false},
      {test::regime::lm_like, backward_mode::chunked, 0, true, true, true, 1024, 200, 3000 + 1, false},
      {test::regime::lm_like, backward_mode::minimal, std::size_t(1) << 20, false, false, false, 1000 + 3, 200,
       3000 + 1, false},
      {test::regime::peaked, backward_mode::minimal, std::size_t(1) << 20, false, true, true, 1000 + 3, 200, 3000 + 1,
       false},
      {test::regime::peaked, backward_mode::minimal, 0, true, false, false, 1000 + 3, 512, 5000 + 1, true},
      {test::regime::peaked, backward_mode::chunked, 0, true, true, true, 1000 + 3, 512, 5000 + 1, true},
  };
  int seed = 70;
  for (const variant& x : variants) {
    test::case_config cfg;
    cfg.n = x.n;
    cfg.d = x.d;
    cfg.v = x.v;
    cfg.data = x.data;
    cfg.seed = std::uint64_t(++seed);
    cfg.opts.backward_mode = x.mode;
    if (!x.filter) cfg.opts.filter = filter_mode::none;
    cfg.opts.accumulate = x.accumulate;
    INFO(cfg.describe() << " budget " << x.budget << " weak first rows " << x.weak_first_rows);
    auto h = test::make_problem<T>(cfg);
    for (std::int64_t i = 0; x.weak_first_rows && i < policy::bm * cfg.d; ++i)
      h.e[std::size_t(i)] = detail::from_float<T>(0.2f * detail::to_float(h.e[std::size_t(i)]));
    const auto check = [&](auto gradient_constant) {
      using G = decltype(gradient_constant);
      const test::device_case<T, G> dc(h, x.budget);
      dc.reset();
      REQUIRE(dc.forward() == status::success);
      REQUIRE(dc.backward() == status::success);
      const auto results = dc.results();
      test::check_case<T, G>(h, results, true, test::gradient_check::relative);
      const auto pl = detail::make_plan<T>(cfg.n, cfg.d, cfg.v, 0, false, cfg.opts, policy::bm, policy::bn, dev,
                                           dc.workspace_bytes(), false, 0, policy::forward_ctas_per_sm);
      REQUIRE(pl.walk_flags);
      const auto bw = pl.template carve_backward<T>(dc.workspace());
      int state[detail::compact_state_count] = {};
      REQUIRE_CUDA(cudaMemcpy(state, bw.compact.state, sizeof(state), cudaMemcpyDeviceToHost));
      const bool fits = state[0] <= pl.compact_capacity();
      INFO(state[0] << " live tiles, " << pl.compact_capacity() << " slots");
      CHECK(fits == (x.budget == 0));
      CHECK(state[1] == pl.grid.row_tiles());
      CHECK(state[2] == (fits ? 1 : 0));
      CHECK(state[3] == (fits ? 0 : 1));
      if (!x.filter) CHECK(state[0] == pl.grid.tiles());
      // dE's parts: one per row tile, or one per compact_part_tiles live tiles where the parts' fp32 sums (128 rows
      // of D each) fit the free slots. Weak first rows: row tile 0's 40 tiles are all live, so it is split.
      std::vector<std::uint8_t> flags(std::size_t(pl.grid.tiles()));
      REQUIRE_CUDA(cudaMemcpy(flags.data(), bw.walk_flags, flags.size(), cudaMemcpyDeviceToHost));
      std::int64_t live = 0, sums = 0, whole = 0, split = 0;
      for (std::int64_t rt = 0; rt < pl.grid.row_tiles(); ++rt) {
        std::int64_t row = 0;
        for (std::int64_t ct = 0; ct < pl.grid.col_tiles(); ++ct)
          row += flags[std::size_t(rt * pl.grid.col_tiles() + ct)];
        const std::int64_t parts =
            row > detail::compact_part_tiles ? detail::ceil_div(row, detail::compact_part_tiles) : 1;
        live += row;
        sums += parts > 1 ? parts : 0;
        split += parts;
        ++whole;
      }
      CHECK(state[0] == live);
      if (fits) {
        const std::int64_t slot_bytes = pl.grid.bm * pl.grid.bn * std::int64_t(sizeof(T)), row_bytes = 4 * cfg.d;
        const bool sums_fit = detail::ceil_div(live * slot_bytes, row_bytes) + sums * pl.grid.bm <=
                              pl.compact_capacity() * slot_bytes / row_bytes;
        CHECK(state[5] == (sums_fit ? split : whole));
        if (x.weak_first_rows) CHECK(state[5] > whole);
      }
      // The slots are taken in whichever order the row tiles come: the gradients do not depend on it.
      if (fits && !x.accumulate) {
        dc.reset();
        REQUIRE(dc.forward() == status::success);
        REQUIRE(dc.backward() == status::success);
        const auto again = dc.results();
        CHECK(test::bitwise_equal(again.de, results.de));
        CHECK(test::bitwise_equal(again.dc, results.dc));
      }
    };
    if (x.fp32_gradients)
      check(float{});
    else
      check(T{});
  }
}

// Each model's preset policy with the model's recommended options, on the model's full D and V (checked in float64
// on the device: the host reference would spend minutes on V x D).
TEST_CASE("GPU: benchmark shapes at a reduced token count, with their presets", "[gpu][shapes]") {
  constexpr std::int64_t n = 1000;  // a ragged last row tile
  test::run_sampled_case<presets::gemma2>({n, 2304, 256000, "gemma2"}, presets::gemma2_options(), 0);
  test::run_sampled_case<presets::llama3>({n, 4096, 128256, "llama3"}, presets::llama3_options(), 0);
  test::run_sampled_case<presets::mistral_nemo>({n, 5120, 131072, "mistral_nemo"}, presets::mistral_nemo_options(), 0);
  test::run_sampled_case<presets::phi3_5>({n, 3072, 32064, "phi3_5"}, presets::phi3_5_options(), 0);
  test::run_sampled_case<presets::qwen2_5>({n, 3584, 152064, "qwen2_5"}, presets::qwen2_5_options(), 0);
  test::run_sampled_case<presets::gpt2>({n, 768, 50304, "gpt2"}, presets::gpt2_options(), 0);
}

TEST_CASE("GPU: results are bitwise repeatable", "[gpu][determinism]") {
  for (bool exact : {true, false}) {
    test::case_config cfg;
    cfg.n = 257;
    cfg.d = 136;
    cfg.v = 1500;
    cfg.bias = true;
    cfg.opts = exact ? options::exact() : options{};
    const auto h = test::make_problem<__nv_bfloat16>(cfg);
    const auto first = run_device<__nv_bfloat16, __nv_bfloat16>(h, 1);
    for (int run = 0; run < 3; ++run) {
      const auto again = run_device<__nv_bfloat16, __nv_bfloat16>(h, 1);
      CHECK(again.loss == first.loss);
      CHECK(again.lse == first.lse);
      CHECK(again.de == first.de);
      CHECK(again.dc == first.dc);
      CHECK(again.dbias == first.dbias);
    }
  }
}

// The filter on one gradient alone, as the executor test of the same name: at a threshold that skips tiles holding a
// visible share of the gradient, deterministic runs in one chunk (the same plan for every variant), on both paths.
TEST_CASE("GPU: the filter on dE or dC alone", "[gpu][filter]") {
  for (bool hopper : {true, false}) {
    test::case_config cfg;
    cfg.n = 512;
    cfg.d = 256;
    cfg.v = 2000;
    cfg.bias = true;
    cfg.data = test::regime::peaked;  // tiles far from the rows' dominant logits are negligible
    cfg.opts = options::exact();
    cfg.opts.filter_eps = 0.5f;
    cfg.opts.hopper_kernels = hopper;
    auto run = [&](filter_mode filter, bool de, bool dc) {
      test::case_config c = cfg;
      c.opts.filter = filter;
      c.opts.filter_de = de;
      c.opts.filter_dc = dc;
      auto h = test::make_problem<__nv_bfloat16>(c);
      // Each row's target is the class beside its dominant one (in the same tile, not dominant: the row's mass lies
      // off its target, on the dominant class): with random targets every 128-row tile would hold a target in every
      // class tile, and target tiles are never skipped.
      for (std::int64_t i = 0; i < cfg.n; ++i) {
        h.t64[std::size_t(i)] = i ^ 1;
        h.t32[std::size_t(i)] = std::int32_t(i ^ 1);
      }
      return run_device<__nv_bfloat16, float>(h, 0);
    };
    INFO("hopper " << hopper);
    test::check_one_gradient_filter(run, test::bitwise_equal);
  }
}

TEST_CASE("GPU: an invalid target is reported and nothing is read out of bounds", "[gpu][errors]") {
  test::case_config cfg;
  cfg.n = 40;
  cfg.d = 32;
  cfg.v = 100;
  auto h = test::make_problem<__nv_bfloat16>(cfg);
  h.t64[3] = cfg.v;  // one past the end
  h.t64[7] = -5;
  const auto r = run_device<__nv_bfloat16, __nv_bfloat16>(h, 0);
  CHECK(r.error == int(status::invalid_target));
  CHECK(std::isnan(r.loss[0]));  // the mean includes the invalid rows' NaN: no garbage presented as a value
}

TEST_CASE("GPU: low-rank head of rank 1 and 16", "[gpu][lora]") {
  for (std::int64_t rank : {1, 16}) {
    for (bool minimal : {false, true}) {
      test::case_config cfg;
      cfg.n = 200;
      cfg.d = 96;
      cfg.v = 700;
      cfg.rank = rank;
      cfg.bias = true;
      cfg.seed = std::uint64_t(rank) * 2 + minimal;
      cfg.opts = options::exact();
      run_case<__nv_bfloat16, __nv_bfloat16>(cfg, minimal ? 1 : 0, test::gradient_check::relative);
      run_case<__nv_bfloat16, float>(cfg, minimal ? 1 : 0, test::gradient_check::relative);
    }
  }
}
