// The reliability guarantees of docs/reliability.md on the GPU: bad input, extreme values, problems past 2^31
// elements, concurrent streams, CUDA-graph capture and replay, bitwise determinism over 20 runs, and a small
// subset for compute-sanitizer. Results are compared with the float64 reference (tests/common/case_check.hpp);
// the [scale] problems, too large for it, with independent float64 kernels on sampled rows and columns.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "../common/device_case.cuh"
#include "../common/extreme_cases.hpp"

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
  CHECK(op.forward(p, plain.outputs(), saved, sb, work, 1) == status::workspace_too_small);
  CHECK(op.forward(p, plain.outputs(), saved, sb - 1, work, wb) == status::workspace_too_small);
  CHECK(op.forward(p, plain.outputs(), nullptr, sb, work, wb) == status::null_pointer);
  CHECK(op.forward(p, plain.outputs(), saved, sb, nullptr, wb) == status::null_pointer);
  CHECK(op.forward(p, plain.outputs(), saved + 128, sb, work, wb) == status::misaligned_pointer);
  CHECK(op.backward(p, {}, plain.grads(), saved, sb, work + 16, wb) == status::misaligned_pointer);
  problem<bf16> odd = p;
  odd.ldc = p.d - 1;
  CHECK(op.forward(odd, plain.outputs(), saved, sb, work, wb) == status::invalid_stride);
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
  test::case_config cfg = medium_case(33);
  cfg.rank = 4;
  cfg.class_weights = true;
  for (std::size_t budget : budgets) {
    for (bool fused : {false, true}) {
      INFO((fused ? "loss_and_grad" : "forward + backward") << " budget=" << budget);
      const auto h = test::make_problem<bf16>(cfg);
      const device_case<bf16, bf16> c(h, budget);
      stream_pair s;
      const auto eager = run_on(c, s.a, fused);
      if (!fused) test::check_case<bf16, bf16>(h, eager, true, test::gradient_check::relative);

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
// Scale: N*V, N*D or V*D past 2^31. Inputs are generated on the device (seeded hash); the float64 check runs
// on the device too, with simple kernels that share nothing with cce: lse for every row, then dE on sampled rows
// and dC on sampled classes.

namespace {

__device__ double unit_hash(std::uint64_t i, std::uint64_t seed) {  // splitmix64 -> [-1, 1)
  std::uint64_t z = i + seed * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return double(z >> 11) * 0x1p-52 - 1.0;
}

__global__ void fill_kernel(bf16* x, std::size_t count, std::uint64_t seed, float scale) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    x[i] = __float2bfloat16(float(unit_hash(i, seed)) * scale);
}

// Every 16th row is ignored.
__global__ void targets_kernel(std::int64_t* y, std::int64_t n, std::int64_t v, std::uint64_t seed) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = i % 16 == 5 ? -100 : std::int64_t((unit_hash(std::uint64_t(i), seed) + 1.0) * 0.5 * double(v)) % v;
}

// Per (row, split) log-sum-exp partials in float64: 128 rows x 16 classes per step, 256 threads, each thread 8
// rows of one class column, then the 16 columns of a row merged in shared memory.
constexpr int lse_rows = 128, lse_cols = 16, lse_k = 16;
__global__ void __launch_bounds__(256) lse64_partial_kernel(const bf16* e, const bf16* c, std::int64_t n,
                                                            std::int64_t v, std::int64_t d, std::int64_t splits,
                                                            double2* partial) {
  __shared__ union {
    struct {
      double e[lse_rows][lse_k + 1], c[lse_cols][lse_k + 1];
    } tile;
    double2 merge[lse_rows][lse_cols];  // after the last tile: the per-column partials of each row
  } sm;
  auto& se = sm.tile.e;
  auto& sc = sm.tile.c;
  auto& merge = sm.merge;
  const int tc = threadIdx.x % lse_cols, tr = threadIdx.x / lse_cols;  // column, group of 8 rows
  const std::int64_t row0 = std::int64_t(blockIdx.x) * lse_rows;
  const std::int64_t col_tiles = (v + lse_cols - 1) / lse_cols;
  const std::int64_t t0 = col_tiles * blockIdx.y / splits, t1 = col_tiles * (blockIdx.y + 1) / splits;
  double m[8], s[8];
  for (int r = 0; r < 8; ++r) m[r] = -INFINITY, s[r] = 0.0;
  for (std::int64_t t = t0; t < t1; ++t) {
    const std::int64_t col = t * lse_cols + tc;
    double acc[8] = {};
    for (std::int64_t k0 = 0; k0 < d; k0 += lse_k) {
      __syncthreads();
      for (int i = threadIdx.x; i < lse_rows * lse_k; i += 256) {
        const std::int64_t r = row0 + i / lse_k, k = k0 + i % lse_k;
        se[i / lse_k][i % lse_k] = r < n && k < d ? double(__bfloat162float(e[r * d + k])) : 0.0;
      }
      {
        const int i = threadIdx.x;  // lse_cols * lse_k == 256
        const std::int64_t cc = t * lse_cols + i / lse_k, k = k0 + i % lse_k;
        sc[i / lse_k][i % lse_k] = cc < v && k < d ? double(__bfloat162float(c[cc * d + k])) : 0.0;
      }
      __syncthreads();
      for (int k = 0; k < lse_k; ++k)
        for (int r = 0; r < 8; ++r) acc[r] += se[tr * 8 + r][k] * sc[tc][k];
    }
    if (col >= v) continue;
    for (int r = 0; r < 8; ++r) {  // online log-sum-exp
      if (acc[r] > m[r]) {
        s[r] = s[r] * exp(m[r] - acc[r]) + 1.0;
        m[r] = acc[r];
      } else {
        s[r] += exp(acc[r] - m[r]);
      }
    }
  }
  __syncthreads();  // the tiles are no longer read: their memory holds the partials
  for (int r = 0; r < 8; ++r) merge[tr * 8 + r][tc] = make_double2(m[r], s[r]);
  __syncthreads();
  if (threadIdx.x < lse_rows && row0 + threadIdx.x < n) {
    double mm = -INFINITY, ss = 0.0;
    for (int j = 0; j < lse_cols; ++j) {
      const double2 p = merge[threadIdx.x][j];
      if (p.y == 0.0) continue;
      const double mx = fmax(mm, p.x);
      ss = ss * exp(mm - mx) + p.y * exp(p.x - mx);
      mm = mx;
    }
    partial[(row0 + threadIdx.x) * splits + blockIdx.y] = make_double2(mm, ss);
  }
}

// lse per row from its partials, and the target logit z_y (one warp per row).
__global__ void lse64_finish_kernel(const double2* partial, std::int64_t splits, const bf16* e, const bf16* c,
                                    const std::int64_t* y, std::int64_t n, std::int64_t d, double* lse, double* zy) {
  const std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  double acc = 0.0;
  if (y[row] >= 0)
    for (std::int64_t k = lane; k < d; k += 32)
      acc += double(__bfloat162float(e[row * d + k])) * double(__bfloat162float(c[y[row] * d + k]));
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane) return;
  double mm = -INFINITY, ss = 0.0;
  for (std::int64_t j = 0; j < splits; ++j) {
    const double2 p = partial[row * splits + j];
    if (p.y == 0.0) continue;
    const double mx = fmax(mm, p.x);
    ss = ss * exp(mm - mx) + p.y * exp(p.x - mx);
    mm = mx;
  }
  lse[row] = mm + log(ss);
  zy[row] = acc;
}

// draw_j = g (p - [target]) for a fixed row i against classes j (by_row), or a fixed class against rows j.
__global__ void draw64_kernel(const bf16* e, const bf16* c, const std::int64_t* y, const double* lse, std::int64_t d,
                              std::int64_t fixed, std::int64_t count, bool by_row, double g, double* draw) {
  const std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= count) return;
  const std::int64_t row = by_row ? fixed : j, col = by_row ? j : fixed;
  if (y[row] < 0) {
    draw[j] = 0.0;
    return;
  }
  double z = 0.0;
  for (std::int64_t k = 0; k < d; ++k)
    z += double(__bfloat162float(e[row * d + k])) * double(__bfloat162float(c[col * d + k]));
  draw[j] = g * (exp(z - lse[row]) - (y[row] == col ? 1.0 : 0.0));
}

// out_k = sum_j w_j m[j, k] and scale_k = sum_j |w_j m[j, k]|, in a fixed order.
__global__ void weighted_rows64_kernel(const double* w, std::int64_t count, const bf16* m, std::int64_t d,
                                       double* out, double* scale) {
  const std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= d) return;
  double s = 0.0, a = 0.0;
  for (std::int64_t j = 0; j < count; ++j) {
    const double t = w[j] * double(__bfloat162float(m[j * d + k]));
    s += t;
    a += fabs(t);
  }
  out[k] = s;
  scale[k] = a;
}

unsigned grid_for(std::int64_t work, int threads) {
  return unsigned(std::min<std::int64_t>((work + threads - 1) / threads, 1 << 20));
}

struct scale_shape {
  std::int64_t n, d, v;
  const char* what;
};

void run_scale_case(const scale_shape& s, options opts, std::size_t budget) {
  INFO(s.what << ": n=" << s.n << " d=" << s.d << " v=" << s.v << " budget=" << budget
                << (opts.backward_mode == backward_mode::minimal ? " minimal" : ""));
  using test::device_vector;
  device_vector<bf16> e(std::size_t(s.n * s.d)), c(std::size_t(s.v * s.d)), de(std::size_t(s.n * s.d)),
      dc(std::size_t(s.v * s.d));
  device_vector<std::int64_t> y(std::size_t(s.n));
  // E ~ U(-1, 1) and C scaled so that logits have a standard deviation near 2: a softmax neither flat nor one-hot.
  const float c_scale = float(2.0 * std::sqrt(3.0) * std::sqrt(3.0 / double(s.d)));
  fill_kernel<<<4096, 256>>>(e.ptr, e.count, 1, 1.f);
  fill_kernel<<<4096, 256>>>(c.ptr, c.count, 2, c_scale);
  targets_kernel<<<grid_for(s.n, 256), 256>>>(y.ptr, s.n, s.v, 3);
  REQUIRE_CUDA(cudaGetLastError());

  problem<bf16> p;
  p.n = s.n;
  p.d = s.d;
  p.v = s.v;
  p.e = e.ptr;
  p.c = c.ptr;
  p.targets = y.ptr;
  const linear_cross_entropy<bf16> op{opts};
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  const std::size_t saved_bytes = op.saved_bytes(p), ws_bytes = op.workspace_bytes(p, dev, budget);
  // The plan stays within the mode's budget, and the saved state is O(N + tiles).
  const std::size_t mode_budget = budget ? budget : std::size_t(256) << 20;
  CHECK(ws_bytes <= mode_budget);
  const std::int64_t tiles = (s.n / 128 + 1) * (s.v / 128 + 1);
  CHECK(saved_bytes <= std::size_t(s.n) * 8 + std::size_t(tiles) * 4 + 4096);
  device_vector<unsigned char> saved(saved_bytes), ws(ws_bytes);
  device_vector<float> loss(1), lse(std::size_t(s.n));
  forward_outputs out;
  out.loss = loss.ptr;
  out.lse = lse.ptr;
  gradients<bf16> g;
  g.de = de.ptr;
  g.dc = dc.ptr;
  REQUIRE(op.loss_and_grad(p, out, g, saved.ptr, saved_bytes, ws.ptr, ws_bytes) == status::success);
  REQUIRE_CUDA(cudaDeviceSynchronize());

  // float64: lse of every row, the loss, then dE rows and dC classes.
  const std::int64_t row_blocks = (s.n + lse_rows - 1) / lse_rows, col_tiles = (s.v + lse_cols - 1) / lse_cols;
  const std::int64_t splits = std::min<std::int64_t>(col_tiles, std::max<std::int64_t>(1, 2048 / row_blocks));
  device_vector<double2> partial(std::size_t(s.n * splits));
  device_vector<double> lse64(std::size_t(s.n)), zy64(std::size_t(s.n));
  lse64_partial_kernel<<<dim3(unsigned(row_blocks), unsigned(splits)), 256>>>(e.ptr, c.ptr, s.n, s.v, s.d, splits,
                                                                              partial.ptr);
  lse64_finish_kernel<<<grid_for(s.n * 32, 256), 256>>>(partial.ptr, splits, e.ptr, c.ptr, y.ptr, s.n, s.d, lse64.ptr,
                                                         zy64.ptr);
  REQUIRE_CUDA(cudaGetLastError());
  const auto ref_lse = lse64.download(), ref_zy = zy64.download();
  const auto targets = y.download();
  double loss_sum = 0.0;
  std::int64_t kept = 0;
  for (std::int64_t i = 0; i < s.n; ++i) {
    if (targets[std::size_t(i)] < 0) continue;
    loss_sum += ref_lse[std::size_t(i)] - ref_zy[std::size_t(i)];
    ++kept;
  }
  const double ref_loss = loss_sum / double(kept);
  // The design's 1e-5 holds for depths up to ~1,000; the rounding error of an fp32 dot product grows as sqrt(D).
  const double tol = 1e-5 * std::max(1.0, std::sqrt(double(s.d) / 1024.0));
  CHECK(std::abs(double(loss.download()[0]) - ref_loss) <= tol * std::abs(ref_loss));
  CHECK(test::relative_l2(lse.download(), ref_lse) <= tol);

  // Sampled rows of dE and classes of dC, first and last included (the far ends of 64-bit offsets).
  const double k_filter = opts.filter == filter_mode::none ? 1.0 : 2.0;
  auto probe = [&](bool by_row, std::int64_t fixed, const device_vector<bf16>& grad, std::vector<double>& want,
                   std::vector<double>& scale, std::vector<float>& have) {
    const std::int64_t count = by_row ? s.v : s.n;
    device_vector<double> draw{std::size_t(count)}, sum{std::size_t(s.d)}, abs_sum{std::size_t(s.d)};
    draw64_kernel<<<grid_for(count, 256), 256>>>(e.ptr, c.ptr, y.ptr, lse64.ptr, s.d, fixed, count, by_row,
                                                 1.0 / double(kept), draw.ptr);
    weighted_rows64_kernel<<<grid_for(s.d, 256), 256>>>(draw.ptr, count, by_row ? c.ptr : e.ptr, s.d, sum.ptr,
                                                        abs_sum.ptr);
    REQUIRE_CUDA(cudaGetLastError());
    const auto w = sum.download(), a = abs_sum.download();
    want.insert(want.end(), w.begin(), w.end());
    scale.insert(scale.end(), a.begin(), a.end());
    std::vector<bf16> row(std::size_t(s.d));
    REQUIRE_CUDA(cudaMemcpy(row.data(), grad.ptr + fixed * s.d, std::size_t(s.d) * sizeof(bf16),
                                cudaMemcpyDeviceToHost));
    for (bf16 x : row) have.push_back(detail::to_float(x));
  };
  std::mt19937_64 rng(s.n ^ s.v);
  for (bool by_row : {true, false}) {
    const std::int64_t count = by_row ? s.n : s.v;
    std::vector<std::int64_t> picks = {0, count - 1};
    for (int i = 0; i < 6; ++i) picks.push_back(std::int64_t(rng() % std::uint64_t(count)));
    std::vector<double> want, scale;
    std::vector<float> have;
    for (std::int64_t fixed : picks) probe(by_row, fixed, by_row ? de : dc, want, scale, have);
    const double err = test::relative_l2(have, want) * test::l2(want);
    const double bound = test::gradient_error_bound<bf16>(test::l2(want), test::l2(scale), k_filter,
                                                          double(by_row ? s.v : s.n), want.size());
    INFO((by_row ? "dE rows" : "dC classes") << ": L2 error " << err << " bound " << bound);
    CHECK(err <= bound);
  }
}

}  // namespace

TEST_CASE("GPU: problems past 2^31 elements, against float64 on sampled rows and classes", "[gpu][scale]") {
  const scale_shape shapes[] = {{65536, 16, 256000, "N*V > 2^31"},
                                {65600, 32768, 64, "N*D > 2^31"},
                                {64, 32768, 65600, "V*D > 2^31"}};
  for (const scale_shape& s : shapes) run_scale_case(s, options{}, 0);
  options minimal;
  minimal.backward_mode = backward_mode::minimal;
  run_scale_case(shapes[0], minimal, std::size_t(64) << 20);
}
