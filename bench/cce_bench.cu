// Benchmark of shared/bench-spec.md: cce's forward, forward+backward in each operating point and loss_and_grad,
// against a cuBLAS bf16 GEMM E C^T timed in the same process on the same buffers. Every figure is reported as a
// ratio to that GEMM (counter `ratio`), with the workspace the mode used (counter `extra_MiB`: workspace plus saved
// state). Every row has the same counters (report()), so that --benchmark_format=csv, which takes its columns from
// the first row, holds them all.
//
//   cce_bench --benchmark_filter=gemma2/peaked
//
// Names are <shape>/<data>/<method>; each runs 10 timed iterations after a warm-up and reports their median. A
// method's iterations each follow one timed GEMM, and its ratio is to the median of those (counter `gemm_ms`): under
// the GPU's power cap the clock falls as a run heats the chip, by an amount that depends on the data and on what ran
// before, so a GEMM timed rows earlier would be compared at another clock (docs/performance.md). The `gemm` rows time
// the GEMM alone; `ratio_gemm_row` is a row's time against that (NaN where the filter left it out), the figure
// earlier versions reported.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cce/cce.cuh>

#include "bench_data.cuh"
#include "event_timing.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace cce_bench;

// The reference product: logits (N x V, bf16) = E C^T of the current inputs, on cuBLAS.
class reference_gemm {
 public:
  reference_gemm(const shape& s, const inputs<>& in) : s_(s), in_(in), out_(std::size_t(s.n * s.v)) {
    if (cublasCreate(&h_) != CUBLAS_STATUS_SUCCESS) std::exit(1);
  }
  ~reference_gemm() { cublasDestroy(h_); }
  reference_gemm(const reference_gemm&) = delete;
  reference_gemm& operator=(const reference_gemm&) = delete;

  // Column-major view: logits^T (V x N) = C (V x D, row-major = D x V col-major)^T ... E^T.
  void operator()() const {
    const float one = 1.f, zero = 0.f;
    cublasGemmEx(h_, CUBLAS_OP_T, CUBLAS_OP_N, int(s_.v), int(s_.n), int(s_.d), &one, in_.c.ptr, CUDA_R_16BF, int(s_.d),
                 in_.e.ptr, CUDA_R_16BF, int(s_.d), &zero, out_.ptr, CUDA_R_16BF, int(s_.v), CUBLAS_COMPUTE_32F,
                 CUBLAS_GEMM_DEFAULT);
  }
  double logits_mib() const { return double(s_.n) * double(s_.v) * sizeof(__nv_bfloat16) / double(1 << 20); }

 private:
  shape s_;
  const inputs<>& in_;
  device_buffer<__nv_bfloat16> out_;
  cublasHandle_t h_{};
};

// The inputs of one shape/regime and their GEMM, kept while its rows run.
struct workload {
  workload(const shape& s, int regime) : in(s, regime), gemm(s, in) {}
  inputs<> in;
  reference_gemm gemm;
  double gemm_row_ms = std::nan("");  // the median of the `gemm` row, once it has run
};
std::unique_ptr<workload> g_workload;
std::string g_key;

workload& get_workload(const shape& s, int regime) {
  const std::string key = std::string(s.name) + "/" + kRegimes[regime];
  if (!g_workload || g_key != key) {
    g_workload.reset();
    g_workload = std::make_unique<workload>(s, regime);
    g_key = key;
  }
  return *g_workload;
}

struct timing {
  double ms, gemm_ms;  // medians of the row's iterations and of the GEMMs timed before each
};

// Times `body` with CUDA events per iteration (manual time), each iteration after one timed call of `gemm` unless it
// is null.
template <class Body>
timing time_it(benchmark::State& st, Body&& body, const reference_gemm* gemm) {
  event_timer timer;
  if (gemm) (*gemm)();
  body();  // warm-up
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> times, gemm_times, enqueue;
  for (auto _ : st) {
    if (gemm) gemm_times.push_back(timer.ms(*gemm));
    const float ms = timer.ms(body);
    st.SetIterationTime(ms / 1e3);
    times.push_back(ms);
    enqueue.push_back(timer.enqueue_ms());
  }
  st.counters["enqueue_ms"] = median(enqueue);  // near the time itself: bound by the host's launches
  const double ms = median(times);
  return {ms, gemm ? median(gemm_times) : ms};
}

// The counters of a row. tflops: 2 N D V over the row's time (the forward's product; for the backward rows the same
// count, a rate to compare with the GEMM's). extra_MiB: memory beyond the inputs and gradients (the GEMM's logits;
// cce's workspace and saved state). minimal, kept_logits: the backward mode that ran. computed_tiles: the share of
// (row tile, vocab tile) pairs the backward computed, 1 where every pair is (the GEMM, the forward).
struct row_counters {
  double extra_mib = 0;
  bool minimal = false, kept_logits = false;
  double computed_tiles = 1;
};

void report(benchmark::State& st, const shape& s, timing t, const row_counters& c) {
  st.counters["ratio"] = t.ms / t.gemm_ms;
  st.counters["gemm_ms"] = t.gemm_ms;
  st.counters["ratio_gemm_row"] = t.ms / g_workload->gemm_row_ms;
  st.counters["tflops"] = 2.0 * double(s.n) * double(s.d) * double(s.v) / (t.ms * 1e9);
  st.counters["extra_MiB"] = c.extra_mib;
  st.counters["minimal"] = c.minimal;
  st.counters["kept_logits"] = c.kept_logits;
  st.counters["computed_tiles"] = c.computed_tiles;
}

void bm_gemm(benchmark::State& st, shape s, int regime) {
  workload& w = get_workload(s, regime);
  const timing t = time_it(st, w.gemm, nullptr);
  w.gemm_row_ms = t.ms;
  report(st, s, t, {w.gemm.logits_mib()});
}

// The -portable methods pin the portable (sm_80) kernels, which are the fast path of pre-Hopper GPUs. The
// -nearly-flat variants set options::uniform_tolerance = 1/16 (docs/api.md: softmaxes that are only nearly flat).
enum class method { fw, fw_portable, fw_bw_minimal, fw_bw_chunked, fw_bw_chunked_portable, loss_and_grad, fw_bw_exact };

void bm_cce(benchmark::State& st, shape s, int regime, method m, float uniform_tolerance) {
  const workload& w = get_workload(s, regime);
  const inputs<>& in = w.in;
  cce::options o = m == method::fw_bw_exact ? cce::options::exact() : cce::options{};
  o.uniform_tolerance = uniform_tolerance;
  o.softcap = s.softcap;
  o.hopper_kernels = m != method::fw_portable && m != method::fw_bw_chunked_portable;
  o.backward_mode = m == method::fw_bw_minimal || m == method::fw_bw_exact ? cce::backward_mode::minimal
                    : m == method::loss_and_grad                           ? cce::backward_mode::loss_and_grad
                                                                           : cce::backward_mode::chunked;
  // The mode's extra-memory budget (shared by the saved state and the workspace): shared/bench-spec.md's.
  const std::size_t extra = o.backward_mode == cce::backward_mode::minimal         ? (std::size_t(64) << 20)
                            : o.backward_mode == cce::backward_mode::loss_and_grad ? (std::size_t(1) << 30)
                                                                                   : (std::size_t(256) << 20);
  cce::linear_cross_entropy<__nv_bfloat16> op{o};
  cce::problem<__nv_bfloat16> p;
  p.n = s.n;
  p.d = s.d;
  p.v = s.v;
  p.e = in.e.ptr;
  p.c = in.c.ptr;
  p.targets = in.y.ptr;
  cce::device_info dev;
  if (cce::current_device(dev) != cce::status::success) std::exit(1);
  const std::size_t saved_bytes = op.saved_bytes(p), ws_bytes = op.workspace_bytes(p, dev, extra - saved_bytes);
  device_buffer<char> saved(saved_bytes), ws(ws_bytes);
  device_buffer<float> loss(1);
  const bool forward_only = m == method::fw || m == method::fw_portable;
  device_buffer<__nv_bfloat16> de(forward_only ? 0 : std::size_t(s.n * s.d)),
      dc(forward_only ? 0 : std::size_t(s.v * s.d));
  cce::forward_outputs out;
  out.loss = loss.ptr;
  cce::gradients<__nv_bfloat16> g;
  g.de = de.ptr;
  g.dc = dc.ptr;
  auto check = [](cce::status r) {
    if (r != cce::status::success) {
      std::fprintf(stderr, "cce: %s\n", cce::to_string(r));
      std::exit(1);
    }
  };
  auto body = [&] {
    if (m == method::loss_and_grad) {
      check(op.loss_and_grad(p, out, g, saved.ptr, saved_bytes, ws.ptr, ws_bytes));
    } else {
      check(op.forward(p, out, saved.ptr, saved_bytes, ws.ptr, ws_bytes));
      if (!forward_only) check(op.backward(p, {}, g, saved.ptr, saved_bytes, ws.ptr, ws_bytes));
    }
  };
  const timing t = time_it(st, body, &w.gemm);
  const cce::backward_mode run_mode = op.mode(p, dev, ws_bytes);
  row_counters c{double(ws_bytes + saved_bytes) / double(1 << 20), run_mode == cce::backward_mode::minimal,
                 run_mode == cce::backward_mode::loss_and_grad};
  if (!forward_only) {  // the share of (row tile, vocab tile) pairs the backward computed, from one more untimed call
    device_buffer<std::int64_t> tiles(2);
    g.filter_tiles = tiles.ptr;
    body();
    std::int64_t counts[2] = {};
    CHECK_CUDA(cudaMemcpy(counts, tiles.ptr, sizeof(counts), cudaMemcpyDeviceToHost));
    if (counts[0] + counts[1] > 0) c.computed_tiles = double(counts[0]) / double(counts[0] + counts[1]);
  }
  report(st, s, t, c);
}

}  // namespace

int main(int argc, char** argv) {
  const std::pair<const char*, method> methods[] = {{"fw", method::fw},
                                                    {"fw-portable", method::fw_portable},
                                                    {"fw-bw-minimal", method::fw_bw_minimal},
                                                    {"fw-bw-chunked", method::fw_bw_chunked},
                                                    {"fw-bw-chunked-portable", method::fw_bw_chunked_portable},
                                                    {"loss-and-grad", method::loss_and_grad},
                                                    {"fw-bw-exact", method::fw_bw_exact}};
  const auto timed = [](benchmark::internal::Benchmark* b) {
    b->UseManualTime()->Iterations(10)->Unit(benchmark::kMillisecond);
  };
  for (const shape& s : kShapes) {
    for (int r = 0; r < 3; ++r) {
      const std::string base = std::string(s.name) + "/" + kRegimes[r] + "/";
      timed(benchmark::RegisterBenchmark((base + "gemm").c_str(), bm_gemm, s, r));
      for (const auto& [name, m] : methods)
        timed(benchmark::RegisterBenchmark((base + name).c_str(), bm_cce, s, r, m, 0.f));
      for (const auto& [name, m] : methods) {
        if (m != method::fw_bw_minimal && m != method::fw_bw_chunked && m != method::loss_and_grad) continue;
        timed(benchmark::RegisterBenchmark((base + name + "-nearly-flat").c_str(), bm_cce, s, r, m, 1.f / 16));
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
