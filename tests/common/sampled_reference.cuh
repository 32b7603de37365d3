// A float64 check for problems too large for the host reference (tests/common/case_check.hpp): inputs are
// generated on the device (seeded hash), and simple kernels that share nothing with cce compute the lse of every
// row, then dE on sampled rows and dC on sampled classes, all in float64 on the device. Used for problems past
// 2^31 elements and for the models' full shapes with their presets.
#pragma once

#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <cce/cce.cuh>
#include "case_check.hpp"
#include "device_problem.hpp"
#include "launch.hpp"

namespace cce::test {
namespace {

using bf16 = __nv_bfloat16;
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

// The logit after the soft cap (softcap 0: none).
__device__ double capped(double z, double softcap) { return softcap > 0 ? softcap * tanh(z / softcap) : z; }

// Per (row, split) log-sum-exp partials in float64: 128 rows x 16 classes per step, 256 threads, each thread 8
// rows of one class column, then the 16 columns of a row merged in shared memory.
constexpr int lse_rows = 128, lse_cols = 16, lse_k = 16;
__global__ void __launch_bounds__(256)
    lse64_partial_kernel(const bf16* e, const bf16* c, std::int64_t n, std::int64_t v, std::int64_t d, double softcap,
                         std::int64_t splits, double2* partial) {
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
    for (int r = 0; r < 8; ++r) acc[r] = capped(acc[r], softcap);
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
                                    const std::int64_t* y, std::int64_t n, std::int64_t d, double softcap, double* lse,
                                    double* zy) {
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
  zy[row] = capped(acc, softcap);
}

// draw_j = g (p - [target]) dz/draw for a fixed row i against classes j (by_row), or a fixed class against rows j.
__global__ void draw64_kernel(const bf16* e, const bf16* c, const std::int64_t* y, const double* lse, std::int64_t d,
                              double softcap, std::int64_t fixed, std::int64_t count, bool by_row, double g,
                              double* draw) {
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
  const double t = softcap > 0 ? tanh(z / softcap) : 0.0;  // d(softcap tanh(z / softcap)) / dz = 1 - t^2
  draw[j] = g * (exp(capped(z, softcap) - lse[row]) - (y[row] == col ? 1.0 : 0.0)) * (1.0 - t * t);
}

// out_k = sum_j w_j m[j, k] and scale_k = sum_j |w_j m[j, k]|, in a fixed order.
__global__ void weighted_rows64_kernel(const double* w, std::int64_t count, const bf16* m, std::int64_t d, double* out,
                                       double* scale) {
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

struct sampled_shape {
  std::int64_t n, d, v;
  const char* what;
};

// Runs loss_and_grad with tile policy `Tile` on generated data of shape `s` and checks the loss, every row's lse,
// and sampled rows of dE and classes of dC. Options beyond the filter, the backward mode and softcap are not
// modelled by the float64 kernels.
template <class Tile = tile::default_policy_t<bf16>>
void run_sampled_case(const sampled_shape& s, options opts, std::size_t budget) {
  INFO(s.what << ": n=" << s.n << " d=" << s.d << " v=" << s.v << " budget=" << budget
              << (opts.backward_mode == backward_mode::minimal ? " minimal" : ""));
  device_vector<bf16> e(std::size_t(s.n * s.d)), c(std::size_t(s.v * s.d)), de(std::size_t(s.n * s.d)),
      dc(std::size_t(s.v * s.d));
  device_vector<std::int64_t> y(std::size_t(s.n));
  // E ~ U(-1, 1) and C scaled so that logits have a standard deviation near 2: a softmax neither flat nor one-hot.
  const float c_scale = float(2.0 * std::sqrt(3.0) * std::sqrt(3.0 / double(s.d)));
  fill_kernel<<<4096, 256>>>(e.ptr, e.count, 1, 1.f);
  fill_kernel<<<4096, 256>>>(c.ptr, c.count, 2, c_scale);
  targets_kernel<<<grid_for(s.n, 256), 256>>>(y.ptr, s.n, s.v, 3);
  REQUIRE_CUDA(cudaGetLastError());

  REQUIRE(opts.temperature == 1.f);
  REQUIRE(opts.label_smoothing == 0.f);
  REQUIRE(opts.z_loss == 0.f);
  REQUIRE(opts.reduction == reduction::mean);
  const double softcap = opts.softcap > 0 ? double(opts.softcap) : 0.0;
  problem<bf16> p;
  p.n = s.n;
  p.d = s.d;
  p.v = s.v;
  p.e = e.ptr;
  p.c = c.ptr;
  p.targets = y.ptr;
  const linear_cross_entropy<bf16, Tile> op{opts};
  device_info dev;
  REQUIRE(current_device(dev) == status::success);
  const std::size_t saved_bytes = op.saved_bytes(p), ws_bytes = op.workspace_bytes(p, dev, budget);
  // The plan stays within the mode's budget, and the saved state is O(N + tiles).
  const std::size_t mode_budget = budget ? budget : std::size_t(256) << 20;
  CHECK(ws_bytes <= mode_budget);
  const std::int64_t tiles = (s.n / 128 + 1) * (s.v / 128 + 1);
  CHECK(saved_bytes <= std::size_t(s.n) * 8 + std::size_t(tiles) * 8 + 4096);
  device_vector<unsigned char> saved(saved_bytes), ws(ws_bytes);
  device_vector<float> loss(1), lse(std::size_t(s.n));
  forward_outputs out;
  out.loss = loss.ptr;
  out.lse = lse.ptr;
  gradients<bf16> g;
  g.de = de.ptr;
  g.dc = dc.ptr;
  REQUIRE(test::loss_and_grad(op, p, out, g, saved.ptr, saved_bytes, ws.ptr, ws_bytes) == status::success);
  REQUIRE_CUDA(cudaDeviceSynchronize());

  // float64: lse of every row, the loss, then dE rows and dC classes.
  const std::int64_t row_blocks = (s.n + lse_rows - 1) / lse_rows, col_tiles = (s.v + lse_cols - 1) / lse_cols;
  const std::int64_t splits = std::min<std::int64_t>(col_tiles, std::max<std::int64_t>(1, 2048 / row_blocks));
  device_vector<double2> partial(std::size_t(s.n * splits));
  device_vector<double> lse64(std::size_t(s.n)), zy64(std::size_t(s.n));
  lse64_partial_kernel<<<dim3(unsigned(row_blocks), unsigned(splits)), 256>>>(e.ptr, c.ptr, s.n, s.v, s.d, softcap,
                                                                              splits, partial.ptr);
  lse64_finish_kernel<<<grid_for(s.n * 32, 256), 256>>>(partial.ptr, splits, e.ptr, c.ptr, y.ptr, s.n, s.d, softcap,
                                                        lse64.ptr, zy64.ptr);
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
  CHECK(relative_l2(lse.download(), ref_lse) <= tol);

  // Sampled rows of dE and classes of dC, first and last included (the far ends of 64-bit offsets).
  const double k_filter = opts.filter == filter_mode::none ? 1.0 : 2.0;
  auto probe = [&](bool by_row, std::int64_t fixed, const device_vector<bf16>& grad, std::vector<double>& want,
                   std::vector<double>& scale, std::vector<float>& have) {
    const std::int64_t count = by_row ? s.v : s.n;
    device_vector<double> draw{std::size_t(count)}, sum{std::size_t(s.d)}, abs_sum{std::size_t(s.d)};
    draw64_kernel<<<grid_for(count, 256), 256>>>(e.ptr, c.ptr, y.ptr, lse64.ptr, s.d, softcap, fixed, count, by_row,
                                                 1.0 / double(kept), draw.ptr);
    weighted_rows64_kernel<<<grid_for(s.d, 256), 256>>>(draw.ptr, count, by_row ? c.ptr : e.ptr, s.d, sum.ptr,
                                                        abs_sum.ptr);
    REQUIRE_CUDA(cudaGetLastError());
    const auto w = sum.download(), a = abs_sum.download();
    want.insert(want.end(), w.begin(), w.end());
    scale.insert(scale.end(), a.begin(), a.end());
    std::vector<bf16> row(std::size_t(s.d));
    REQUIRE_CUDA(
        cudaMemcpy(row.data(), grad.ptr + fixed * s.d, std::size_t(s.d) * sizeof(bf16), cudaMemcpyDeviceToHost));
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
    const double err = relative_l2(have, want) * l2(want);
    const double bound =
        gradient_error_bound<bf16>(l2(want), l2(scale), k_filter, double(by_row ? s.v : s.n), want.size());
    INFO((by_row ? "dE rows" : "dC classes") << ": L2 error " << err << " bound " << bound);
    CHECK(err <= bound);
  }
}

}  // namespace
}  // namespace cce::test
