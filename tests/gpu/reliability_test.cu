// The reliability guarantees of docs/reliability.md on the GPU: bad input, extreme values, problems past 2^31
// elements, concurrent streams, CUDA-graph capture and replay, bitwise determinism over 20 runs, and a small
// subset for compute-sanitizer. Results are compared with the float64 reference (tests/common/case_check.hpp);
// the [scale] problems, too large for it, with the float64 kernels of tests/common/sampled_reference.cuh.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "../common/device_case.cuh"
#include "../common/extreme_cases.hpp"
#include "../common/sampled_reference.cuh"

namespace {

using namespace cce;
using bf16 = __nv_bfloat16;
using test::device_case;
using test::run_device;

constexpr std::size_t budgets[] = {0, 1};  // chunked (default budget) and the smallest minimal plan

// Several row tiles, vocab tiles, splits and (with budget 1) row blocks and chunks.
test::case_config medium_case(std::uint64_t seed) {
  test::case_config cfg;
  cfg.n = 300;
  cfg.d = 72;
  cfg.v = 700;
  cfg.bias = true;
  cfg.seed = seed;
  return cfg;
}

struct stream_pair {
  cudaStream_t a = nullptr, b = nullptr;
  stream_pair() {
    REQUIRE_CUDA(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    REQUIRE_CUDA(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
  }
  ~stream_pair() {
    cudaStreamDestroy(a);
    cudaStreamDestroy(b);
  }
};

template <class T, class G>
test::case_results run_on(const device_case<T, G>& c, cudaStream_t s, bool fused = false) {
  c.reset(s);
  if (fused) {
    REQUIRE(c.loss_and_grad(s) == status::success);
  } else {
    REQUIRE(c.forward(s) == status::success);
    REQUIRE(c.backward(s) == status::success);
  }
  return c.results();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Bad input

TEST_CASE("GPU: invalid targets are reported, the loss is NaN, the other rows are untouched", "[gpu][bad-input]") {
  for (auto red : {reduction::mean, reduction::none}) {
    for (std::size_t budget : budgets) {
      test::case_config cfg = medium_case(21);
      cfg.opts.reduction = red;
      auto h = test::make_problem<bf16>(cfg);
      auto clean = h;  // the same problem with the bad rows ignored
      for (std::int64_t row : {3, 130, 299}) {
        h.t64[std::size_t(row)] = row == 3 ? cfg.v : row == 130 ? -5 : std::int64_t(1) << 40;
        clean.t64[std::size_t(row)] = cfg.opts.ignore_index;
      }
      INFO(cfg.describe() << " budget=" << budget);
      const auto r = run_device<bf16, bf16>(h, budget);
      const auto ok = run_device<bf16, bf16>(clean, budget);
      test::check_case<bf16, bf16>(clean, ok, true);
      CHECK(r.error == int(status::invalid_target));
      for (std::size_t i = 0; i < r.loss.size(); ++i) {
        const bool bad = red == reduction::mean || i == 3 || i == 130 || i == 299;
        CHECK(std::isnan(r.loss[i]) == bad);
      }
      CHECK(test::bitwise_equal(r.lse, ok.lse));
      CHECK(test::bitwise_equal(r.de, ok.de));
      CHECK(test::bitwise_equal(r.dc, ok.dc));
      CHECK(test::bitwise_equal(r.dbias, ok.dbias));
    }
  }
}

TEST_CASE("GPU: ignore_index other than -100, every row ignored, degenerate shapes", "[gpu][bad-input]") {
  for (std::int64_t ignore : {std::int64_t(-1), std::int64_t(5)}) {
    test::case_config cfg = medium_case(22);
    cfg.opts.ignore_index = ignore;
    auto h = test::make_problem<bf16>(cfg);
    for (std::int64_t row : {1, 2, 200}) h.t64[std::size_t(row)] = ignore;
    h.t64[7] = -100;  // an ordinary, invalid, target now
    const auto r = run_device<bf16, bf16>(h, 0);
    CHECK(r.error == int(status::invalid_target));
    h.t64[7] = 0;
    test::check_case<bf16, bf16>(h, run_device<bf16, bf16>(h, 0), true);
  }
  for (auto red : {reduction::mean, reduction::sum, reduction::none}) {
    for (std::size_t budget : budgets) {
      test::case_config cfg = medium_case(23);
      cfg.ignore_fraction = 1.0;
      cfg.opts.reduction = red;
      const auto h = test::make_problem<bf16>(cfg);
      const auto r = run_device<bf16, bf16>(h, budget);
      test::check_case<bf16, bf16>(h, r, true);
      CHECK((red == reduction::mean) == std::isnan(r.loss[0]));  // 0/0, as torch
      for (const auto* g : {&r.de, &r.dc, &r.dbias})
        for (float x : *g) CHECK(x == 0.f);
    }
  }
  struct shape {
    std::int64_t n, d, v;
  };
  for (shape s : {shape{0, 72, 700}, shape{300, 72, 1}, shape{300, 1, 700}, shape{1, 1, 1}}) {
    for (auto red : {reduction::mean, reduction::sum, reduction::none}) {
      for (std::size_t budget : budgets) {
        test::case_config cfg = medium_case(24);
        cfg.n = s.n;
        cfg.d = s.d;
        cfg.v = s.v;
        cfg.opts.reduction = red;
        cfg.opts.z_loss = 1e-3f;
        const auto h = test::make_problem<bf16>(cfg);
        // Tiny D or V is ill-conditioned: the rounding bound, as for the randomized cases.
        test::check_case<bf16, bf16>(h, run_device<bf16, bf16>(h, budget), true, test::gradient_check::bound);
      }
    }
  }
}

TEST_CASE("GPU: a rank-0 head is ignored; bad buffers are rejected before anything runs", "[gpu][bad-input]") {
  const auto h = test::make_problem<bf16>(medium_case(25));
  const device_case<bf16, bf16> plain(h, 0);
  const device_case<bf16, bf16> rank0(h, 0, [&](problem<bf16>& p) {
    p.lora.a = plain.device_view().c;  // rank 0: never read
    p.lora.b = plain.device_view().c;
    p.lora.scale = NAN;
  });
  test::check_bitwise_equal(run_on(plain, nullptr), run_on(rank0, nullptr));

  // The functor checks its buffers after the device query: bad ones return a status and the poison stays.
  const auto& op = plain.op();
  const problem<bf16>& p = plain.device_view();
  plain.reset();
  char* saved = static_cast<char*>(plain.saved());
  char* work = static_cast<char*>(plain.workspace());
  const std::size_t sb = plain.saved_bytes(), wb = plain.workspace_bytes();
  CHECK(test::forward(op, p, plain.outputs(), saved, sb, work, 1) == status::workspace_too_small);
  CHECK(test::forward(op, p, plain.outputs(), saved, sb - 1, work, wb) == status::workspace_too_small);
  CHECK(test::forward(op, p, plain.outputs(), nullptr, sb, work, wb) == status::null_pointer);
  CHECK(test::forward(op, p, plain.outputs(), saved, sb, nullptr, wb) == status::null_pointer);
  CHECK(test::forward(op, p, plain.outputs(), saved + 128, sb, work, wb) == status::misaligned_pointer);
  CHECK(test::backward(op, p, {}, plain.grads(), saved, sb, work + 16, wb) == status::misaligned_pointer);
  problem<bf16> odd = p;
  odd.ldc = p.d - 1;
  CHECK(test::forward(op, odd, plain.outputs(), saved, sb, work, wb) == status::invalid_stride);
  const auto untouched = plain.results();
  CHECK(std::isnan(untouched.loss[0]));
  CHECK(test::all_nan(untouched.lse));
  CHECK(test::all_nan(untouched.de));
  CHECK(untouched.error == 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Extreme values

TEST_CASE("GPU: extreme values against the float64 reference", "[gpu][extreme]") {
  for (bool exact : {true, false}) {
    for (auto& c : test::extreme_cases<bf16>(exact ? options::exact() : options{})) {
      for (std::size_t budget : budgets) {
        INFO(c.what << (exact ? " (exact)" : " (default)") << " budget=" << budget);
        const auto r = run_device<bf16, bf16>(c.h, budget);
        test::check_case<bf16, bf16>(c.h, r, true, c.mode);
        c.expect(r);
      }
    }
    auto c = test::fp16_near_overflow(exact ? options::exact() : options{});
    INFO(c.what);
    const auto r = run_device<__half, __half>(c.h, 0);
    test::check_case<__half, __half>(c.h, r, true, c.mode);
    c.expect(r);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Concurrency, graphs, determinism

TEST_CASE("GPU: two problems on two streams at once equal the serial runs bitwise", "[gpu][streams]") {
  test::case_config a_cfg = medium_case(31);
  a_cfg.n = 1000;
  a_cfg.v = 3000;
  test::case_config b_cfg = medium_case(32);
  b_cfg.d = 64;
  b_cfg.rank = 8;
  b_cfg.class_weights = true;
  b_cfg.opts = options::exact();
  b_cfg.opts.label_smoothing = 0.1f;
  const device_case<bf16, bf16> a(test::make_problem<bf16>(a_cfg), 0);
  const device_case<__half, float> b(test::make_problem<__half>(b_cfg), 1);
  const auto a_serial = run_on(a, nullptr), b_serial = run_on(b, nullptr);
  stream_pair s;
  for (int round = 0; round < 3; ++round) {
    cudaStream_t sa = round % 2 ? s.b : s.a, sb = round % 2 ? s.a : s.b;
    a.reset(sa);
    b.reset(sb);
    REQUIRE(a.forward(sa) == status::success);
    REQUIRE(b.forward(sb) == status::success);
    REQUIRE(a.backward(sa) == status::success);
    REQUIRE(b.backward(sb) == status::success);
    test::check_bitwise_equal(a.results(), a_serial);
    test::check_bitwise_equal(b.results(), b_serial);
  }
}

TEST_CASE("GPU: forward + backward and loss_and_grad captured in a CUDA graph, replayed 100 times", "[gpu][graph]") {
  for (std::size_t budget : budgets) {
    // forward + backward; loss_and_grad; loss_and_grad with backward_mode::loss_and_grad, which keeps the logits on
    // the sm_90a path (at the default budget; the smallest one gives no logit block and runs forward + backward)
    for (int call = 0; call < 3; ++call) {
      const bool fused = call > 0;
      test::case_config cfg = medium_case(33);
      cfg.rank = 4;
      cfg.class_weights = true;
      if (call == 2) {
        cfg.opts.backward_mode = backward_mode::loss_and_grad;
        cfg.unit_grad = true;
      }
      INFO((call == 2 ? "loss_and_grad keeping logits" : fused ? "loss_and_grad" : "forward + backward")
           << " budget=" << budget);
      const auto h = test::make_problem<bf16>(cfg);
      const device_case<bf16, bf16> c(h, budget);
      if (call == 2 && budget == 0) {  // the logits are kept wherever the sm_90a forward runs
        device_info dev;
        REQUIRE(current_device(dev) == status::success);
        const bool sm90a = dev.arch == 90 && detail::sm90::has_sm90a_image(detail::sm90::forward_kernel<bf16, false>);
        CHECK((c.op().mode(c.device_view(), dev, c.workspace_bytes()) == backward_mode::loss_and_grad) == sm90a);
      }
      stream_pair s;
      const auto eager = run_on(c, s.a, fused);
      if (call != 1) test::check_case<bf16, bf16>(h, eager, true, test::gradient_check::relative);

      // Global capture mode: a host synchronisation or an allocation inside the calls fails the capture.
      cudaGraph_t graph = nullptr;
      REQUIRE_CUDA(cudaStreamBeginCapture(s.a, cudaStreamCaptureModeGlobal));
      const status first = fused ? c.loss_and_grad(s.a) : c.forward(s.a);
      const status second = fused ? status::success : c.backward(s.a);
      const cudaError_t ended = cudaStreamEndCapture(s.a, &graph);
      REQUIRE(first == status::success);
      REQUIRE(second == status::success);
      REQUIRE(ended == cudaSuccess);
      cudaGraphExec_t exec = nullptr;
      REQUIRE_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      int identical = 0;
      for (int replay = 0; replay < 100; ++replay) {
        c.reset(s.a);  // poison between replays: each one must write everything again
        REQUIRE_CUDA(cudaGraphLaunch(exec, s.a));
        const auto r = c.results();
        identical += test::bitwise_equal(r.loss, eager.loss) && test::bitwise_equal(r.lse, eager.lse) &&
                     test::bitwise_equal(r.entropy, eager.entropy) && r.correct == eager.correct &&
                     test::bitwise_equal(r.de, eager.de) && test::bitwise_equal(r.dc, eager.dc) &&
                     test::bitwise_equal(r.dbias, eager.dbias) && test::bitwise_equal(r.da, eager.da) &&
                     test::bitwise_equal(r.db, eager.db);
      }
      CHECK(identical == 100);
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
  }
}

TEST_CASE("GPU: the first calls of a process captured in a CUDA graph", "[gpu][graph][first-captured]") {
  // What a call does once per process (kernel attributes, the persistent forward's query of resident clusters) runs
  // on the first call of each kernel. Run alone, as ctest's reliability_first_calls_captured does, this case makes
  // those first calls inside a global-mode capture, which fails if any of them is not allowed there.
  test::case_config stepwise_cfg = medium_case(35);
  stepwise_cfg.n = 512;  // four row tiles: the sm_90a forward in clusters of two, persistent over short class runs
  test::case_config fused_cfg = stepwise_cfg;
  fused_cfg.seed = 36;
  fused_cfg.opts.backward_mode = backward_mode::loss_and_grad;  // keeps the logits on the sm_90a path
  fused_cfg.unit_grad = true;
  {
    using policy = tile::default_policy_t<bf16>;
    device_info dev;
    REQUIRE(current_device(dev) == status::success);
    const auto pl = detail::make_plan<bf16>(stepwise_cfg.n, stepwise_cfg.d, stepwise_cfg.v, 0, true, stepwise_cfg.opts,
                                            policy::bm, policy::bn, dev, 0, false, 0, policy::forward_ctas_per_sm);
    CHECK(detail::sm90::shares_classifier(pl.grid.row_tiles(), stepwise_cfg.v, stepwise_cfg.d, pl.splits));
    CHECK_FALSE(detail::sm90::long_class_runs(stepwise_cfg.v, stepwise_cfg.d, pl.splits));
  }
  const auto stepwise_h = test::make_problem<bf16>(stepwise_cfg), fused_h = test::make_problem<bf16>(fused_cfg);
  const device_case<bf16, bf16> stepwise(stepwise_h, 0), fused(fused_h, 0);
  stream_pair s;
  stepwise.reset(s.a);
  fused.reset(s.a);
  cudaGraph_t graph = nullptr;
  REQUIRE_CUDA(cudaStreamBeginCapture(s.a, cudaStreamCaptureModeGlobal));
  const status calls[] = {stepwise.forward(s.a), stepwise.backward(s.a), fused.loss_and_grad(s.a)};
  const cudaError_t ended = cudaStreamEndCapture(s.a, &graph);
  for (status st : calls) REQUIRE(st == status::success);
  REQUIRE(ended == cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  REQUIRE_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  REQUIRE_CUDA(cudaGraphLaunch(exec, s.a));
  test::check_case<bf16, bf16>(stepwise_h, stepwise.results(), true, test::gradient_check::relative);
  test::check_case<bf16, bf16>(fused_h, fused.results(), true, test::gradient_check::relative);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

TEST_CASE("GPU: 20 runs on two streams are bitwise identical, deterministic and default mode", "[gpu][determinism20]") {
  test::case_config cfg = medium_case(34);
  cfg.n = 700;
  cfg.v = 2500;
  cfg.rank = 4;
  cfg.class_weights = true;
  stream_pair s;
  for (bool deterministic : {true, false}) {
    for (std::size_t budget : budgets) {
      cfg.opts = deterministic ? options::exact() : options{};
      INFO((deterministic ? "options::exact()" : "default options") << " budget=" << budget);
      const device_case<bf16, bf16> c(test::make_problem<bf16>(cfg), budget);
      const auto first = run_on(c, s.a);
      for (int run = 1; run < 20; ++run) test::check_bitwise_equal(run_on(c, run % 2 ? s.b : s.a), first);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// compute-sanitizer subset: small shapes, every launch sequence once.

TEST_CASE("GPU: small cases of every path, for compute-sanitizer", "[gpu][sanitize]") {
  test::case_config cfg;
  cfg.n = 70;
  cfg.d = 40;
  cfg.v = 300;
  cfg.bias = true;
  cfg.rank = 4;
  cfg.seed = 41;
  for (bool exact : {true, false}) {
    cfg.opts = exact ? options::exact() : options{};
    auto h = test::make_problem<bf16>(cfg);
    for (std::size_t budget : budgets) {  // forward, chunked and minimal backward, low-rank head
      test::check_case<bf16, bf16>(h, run_device<bf16, bf16>(h, budget), true);
      const device_case<bf16, float> fused(h, budget);
      const auto r = run_on(fused, nullptr, true);
      CHECK(r.error == 0);
    }
    h.t64[5] = cfg.v;  // an invalid target
    h.e[std::size_t(9 * cfg.d)] = detail::from_float<bf16>(NAN);  // and a NaN
    const auto r = run_device<bf16, bf16>(h, 1);
    CHECK(r.error == int(status::invalid_target));
    CHECK(std::isnan(r.lse[9]));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scale: N*V, N*D or V*D past 2^31, against the float64 kernels of tests/common/sampled_reference.cuh.

TEST_CASE("GPU: problems past 2^31 elements, against float64 on sampled rows and classes", "[gpu][scale]") {
  const test::sampled_shape shapes[] = {
      {65536, 16, 256000, "N*V > 2^31"}, {65600, 32768, 64, "N*D > 2^31"}, {64, 32768, 65600, "V*D > 2^31"}};
  for (const test::sampled_shape& s : shapes) test::run_sampled_case(s, options{}, 0);
  options minimal;
  minimal.backward_mode = backward_mode::minimal;
  test::run_sampled_case(shapes[0], minimal, std::size_t(64) << 20);
}
