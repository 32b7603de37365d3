// Vocabulary sorting for the backward (options::vocab_sort): the sort key of every class, the order and its
// inverse, the targets in sorted positions, and each chunk's gathered rows.
//
// The key is the class's average logit over the kept rows before softcap and temperature (both monotonic):
//   key_v = c_v . e_bar + b_v + B_v . (scale * A e_bar),   e_bar = mean of the kept rows of E,
// which is linear in E, so it costs a column mean of E and a GEMV over C, never a GEMM. Every sum runs in a fixed
// order and the sort (CUB's radix sort) is stable, so the order is the same on every run.
// The kernels are templates even where they have no parameter of their own (row_kernels.cuh says why).
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <cstdint>

#include <cce/detail/element_type.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/kernel/portable/warp_reduce.cuh>

namespace cce::detail {

// Column sums of the kept rows of E over one split of the rows, and (column D) how many rows were kept.
// Grid: (ceil((D + 1) / threads), mean_splits).
template <class T>
__global__ void column_sum_kernel(const T* e, std::int64_t lde, std::int64_t n, std::int64_t d,
                                  const row_coefficients* coef, std::int64_t splits, float* partial) {
  const std::int64_t col = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col > d) return;
  const std::int64_t r0 = tile::split_begin(n, splits, blockIdx.y), r1 = tile::split_begin(n, splits, blockIdx.y + 1);
  float s = 0.f;
  for (std::int64_t row = r0; row < r1; ++row) {
    if (!coef[row].kept) continue;
    s += col < d ? to_float(e[row * lde + col]) : 1.f;
  }
  partial[std::int64_t(blockIdx.y) * (d + 1) + col] = s;
}

// e_bar (D values) and the kept count: the splits' sums in order. No kept row gives e_bar = 0.
template <class = void>
__global__ void column_mean_kernel(const float* partial, std::int64_t d, std::int64_t splits, float* out) {
  const std::int64_t col = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col > d) return;
  float s = 0.f, count = 0.f;
  for (std::int64_t k = 0; k < splits; ++k) {
    s += partial[k * (d + 1) + col];
    count += partial[k * (d + 1) + d];
  }
  out[col] = col == d ? count : (count > 0.f ? s / count : 0.f);
}

template <class T>
struct sort_key_params {
  const T* c = nullptr;
  std::int64_t ldc = 0, v = 0, d = 0;
  const float* e_bar = nullptr;   // D
  const T* bias = nullptr;        // V, optional
  const T* lora_b = nullptr;      // V x rank, leading dimension ldb
  const float* lora_u = nullptr;  // rank: scale * A e_bar
  std::int64_t rank = 0, ldb = 0;
  float* keys = nullptr;            // V
  std::int32_t* classes = nullptr;  // V: v (the values the sort carries along)
};

// One warp per class: key_v, lanes over D, then a fixed butterfly.
template <class T>
__global__ void sort_key_kernel(const __grid_constant__ sort_key_params<T> prm) {
  const std::int64_t v = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (v >= prm.v) return;
  const T* row = prm.c + v * prm.ldc;
  float s = 0.f;
  for (std::int64_t k = lane; k < prm.d; k += 32) s += to_float(row[k]) * prm.e_bar[k];
  for (std::int64_t k = lane; k < prm.rank; k += 32) s += to_float(prm.lora_b[v * prm.ldb + k]) * prm.lora_u[k];
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) s += shuffle_xor(s, mask);
  if (lane == 0) {
    prm.keys[v] = s + (prm.bias ? to_float(prm.bias[v]) : 0.f);
    prm.classes[v] = std::int32_t(v);
  }
}

// position[order[i]] = i.
template <class = void>
__global__ void invert_order_kernel(const std::int32_t* order, std::int64_t v, std::int32_t* position) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < v) position[order[i]] = std::int32_t(i);
}

// Each row's target column becomes its sorted position (the target may land in any chunk).
template <class = void>
__global__ void sorted_targets_kernel(row_coefficients* coef, std::int64_t n, const std::int32_t* position) {
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < n && coef[row].target >= 0) coef[row].target = position[coef[row].target];
}

template <class T>
struct gather_params {
  const std::int32_t* classes = nullptr;  // cols: the class of each gathered row
  std::int64_t cols = 0, d = 0;
  const T* c = nullptr;
  std::int64_t ldc = 0;
  const T* bias = nullptr;
  const float* weights = nullptr;
  const T* lora_b = nullptr;
  std::int64_t rank = 0, ldb = 0;
  T* c_out = nullptr;  // cols x D
  T* bias_out = nullptr;
  float* weights_out = nullptr;
  T* b_out = nullptr;  // cols x rank
};

// One block per gathered class: its C row, bias, weight and B row.
template <class T>
__global__ void gather_classes_kernel(const __grid_constant__ gather_params<T> prm) {
  const std::int64_t j = blockIdx.x;
  const std::int64_t cls = prm.classes[j];
  const T* src = prm.c + cls * prm.ldc;
  T* dst = prm.c_out + j * prm.d;
  for (std::int64_t k = threadIdx.x; k < prm.d; k += blockDim.x) dst[k] = src[k];
  for (std::int64_t k = threadIdx.x; k < prm.rank; k += blockDim.x)
    prm.b_out[j * prm.rank + k] = prm.lora_b[cls * prm.ldb + k];
  if (threadIdx.x == 0) {
    if (prm.bias_out) prm.bias_out[j] = prm.bias[cls];
    if (prm.weights_out) prm.weights_out[j] = prm.weights[cls];
  }
}

// Bytes of scratch the device sort of V float keys with int32 values needs (double-buffered: no key copies; V
// fits an int, validate.hpp).
// The size follows the current device's architecture; without a usable device a generous bound is returned
// (the backward queries again and checks the workspace against the exact figure).
inline std::size_t sort_temp_bytes(std::int64_t v) {
  std::size_t bytes = 0;
  cub::DoubleBuffer<float> keys(nullptr, nullptr);
  cub::DoubleBuffer<std::int32_t> values(nullptr, nullptr);
  if (cub::DeviceRadixSort::SortPairsDescending(nullptr, bytes, keys, values, int(v)) != cudaSuccess) {
    cudaGetLastError();
    return std::size_t(v) * 8 + (std::size_t(1) << 20);
  }
  return bytes;
}

}  // namespace cce::detail
