// When and how the Hopper (sm_90a) kernels replace their portable counterparts: on compute capability 9.0, for 16-bit
// inputs whose rows TMA can address (16-byte aligned base and row pitch), with the default 128 x 128 filter grid, and
// only when the program was compiled for sm_90a (an sm_80 or plain sm_90 image has no such kernel).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cce/dispatch/clusters.hpp>
#include <cce/dispatch/plan.hpp>
#include <cce/dispatch/smem_limit.hpp>
#include <cce/kernel/sm90/dlogit.cuh>
#include <cce/kernel/sm90/forward.cuh>
#include <cce/kernel/sm90/grad_gemm.cuh>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>

namespace cce::detail::sm90 {

template <class T>
inline constexpr bool tensor_core_type = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// The kernel carries its sm_90a body (which declares static shared memory) in the image the device loads.
template <class Kernel>
bool has_sm90a_image(Kernel kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == 90 && attr.sharedSizeBytes > 0;
}

template <class T>
bool available(const problem<T>& p, const plan& pl, const device_info& dev, const options& o) {
  if constexpr (!tensor_core_type<T>) {
    return false;
  } else {
    constexpr std::int64_t coordinate_limit = std::int64_t(1) << 31;  // TMA coordinates are int32
    return o.hopper_kernels && dev.arch == 90 && pl.grid.bm == forward_shape::bm &&
           pl.grid.bn == forward_shape::filter_bn && p.n < coordinate_limit && p.v < coordinate_limit &&
           p.d < coordinate_limit && tma_addressable(p.e, p.e_stride(), sizeof(T)) &&
           tma_addressable(p.c, p.c_stride(), sizeof(T)) && has_sm90a_image(forward_kernel<T, false>);
  }
}

// The forward on a device of `sms` SMs; with `kept`, the variant that also writes the logit tiles there
// (loss_and_grad, plan.hpp).
template <class T>
status launch_forward(const forward_params<T>& base, int sms, cudaStream_t stream, const kept_logits* kept = nullptr) {
  if constexpr (!tensor_core_type<T>) {
    return status::unsupported_arch;
  } else {
    forward_params_sm90<T> prm;
    prm.base = base;
    if (kept) prm.kept = *kept;
    if (!encode_logit_maps<forward_ring<T>>(prm.maps, base.e, base.c)) {
      return status::unsupported_arch;
    }
    using S = forward_shape;
    prm.share_classifier = shares_classifier(base.grid.row_tiles(), base.grid.cols, base.e.depth, base.splits);
    const int cluster = prm.share_classifier ? forward_cluster : 1;
    const std::int64_t units = ceil_div(base.grid.row_tiles(), std::int64_t(cluster)) * base.splits;
    if (units == 0) return status::success;
    const auto launch = [&](auto kernel_constant) {
      constexpr auto kernel = decltype(kernel_constant)::value;
      if (!allow_dynamic_smem<kernel>(S::smem_bytes<T>)) return status::unsupported_arch;
      // With long runs, a cluster per unit, which the GPU hands to pairs of SMs as they free up (persistent clusters
      // measured no faster there); otherwise persistent, one CTA per SM or as many clusters as the device holds at
      // once, walking the units.
      std::int64_t slots = sms;
      if (long_class_runs(base.grid.cols, base.e.depth, base.splits))
        slots = units;
      else if (cluster > 1)
        slots = resident_clusters<kernel>(cluster, S::threads, S::smem_bytes<T>, sms / cluster);
      const dim3 grid{unsigned(std::min<std::int64_t>(units, std::max<std::int64_t>(slots, 1)) * cluster)};
      // The filter's tile maxima start below every float: the kernel's warps fold theirs in (atomic_max_float).
      if (base.tile_max &&
          cudaMemsetAsync(base.tile_max, 0xFF, sizeof(float) * base.grid.tiles(), stream) != cudaSuccess)
        return status::cuda_error;
      launch_clustered(kernel, grid, S::threads, S::smem_bytes<T>, cluster, stream, prm);
      return cudaGetLastError() == cudaSuccess ? status::success : status::cuda_error;
    };
    if (kept) return launch(std::integral_constant<decltype(&forward_kernel<T, true>), &forward_kernel<T, true>>{});
    if (capped_softmax::applies(base.terms.transform))
      return launch(
          std::integral_constant<decltype(&forward_kernel<T, false, true>), &forward_kernel<T, false, true>>{});
    return launch(std::integral_constant<decltype(&forward_kernel<T, false>), &forward_kernel<T, false>>{});
  }
}

// The backward's dlogit step for one (row block, chunk): the filter flags (unless the caller wrote them), then the
// tiles on (at most) `sms` CTAs.
template <class T>
status launch_dlogits(const dlogit_params<T>& base, std::int64_t rows, std::int64_t cols, int sms, bool flags_written,
                      cudaStream_t stream) {
  if constexpr (!tensor_core_type<T>) {
    return status::unsupported_arch;
  } else {
    using S = logit_tile_shape;
    const std::int64_t row_tiles = ceil_div(rows, S::bm), wide_tiles = ceil_div(cols, S::bn);
    if (row_tiles == 0 || wide_tiles == 0) return status::success;
    const std::int64_t tiles = row_tiles * wide_tiles, ctas = std::min<std::int64_t>(tiles, sms);  // one per SM
    if (ceil_div(tiles, ctas) > dlogit_tiles_per_cta) return status::unsupported_arch;
    if (!flags_written) {
      tile_flags_kernel<T><<<dim3(unsigned(row_tiles), unsigned(wide_tiles)), 128, 0, stream>>>(base);
      if (cudaGetLastError() != cudaSuccess) return status::cuda_error;
    }

    dlogit_params_sm90<T> prm;
    prm.base = base;
    prm.rows = rows;
    prm.cols = cols;
    if (!encode_logit_maps<tile_ring<T>>(prm.maps, base.e, base.c)) {
      return status::unsupported_arch;
    }
    constexpr std::size_t smem = S::smem_bytes<T>;
    if (!allow_dynamic_smem<dlogit_kernel<T>>(smem)) return status::unsupported_arch;
    dlogit_kernel<T><<<unsigned(ctas), S::threads, smem, stream>>>(prm);
    return cudaGetLastError() == cudaSuccess ? status::success : status::cuda_error;
  }
}

// The kernel parameters of a gradient product: its operand maps and tile counts; false when TMA cannot address an
// operand.
template <major MajorA, class T, class G, int KTile>
bool encode_grad_gemm(grad_gemm_params_sm90<T, G>& prm, const grad_gemm_params<T, G, KTile>& base) {
  using S = grad_gemm_shape;
  prm.base = base;
  prm.m_tiles = int(ceil_div(base.m, S::bm));
  prm.n_tiles = int(ceil_div(base.n, S::bn));
  prm.tma = encode_output_map(prm.out_map, prm.carry_map, prm.carry_halves_map, base);
  // A carry that shares the output's buffer is laid out for the TMA epilogue alone.
  if (base.carry_shares_output && prm.tma == tma_write::none) return false;
  return tma_addressable(base.a.ptr, base.a.ld, sizeof(T)) && tma_addressable(base.b.ptr, base.b.ld, sizeof(T)) &&
         encode_operand_map<T, MajorA>(prm.maps.a, base.a, S::bm) &&
         encode_operand_map<T, major::mn>(prm.maps.b, base.b, S::bn);
}

// The persistent kernel on at most `sms` CTAs; unsupported_arch when it cannot have its shared memory (the caller then
// runs a CTA per tile).
template <class T, class G>
status launch_persistent(grad_gemm_pair_params_sm90<T, G>& prm, int* queue, int sms, cudaStream_t stream) {
  constexpr std::size_t smem = persistent_shape::smem_bytes<T>;
  if (!allow_dynamic_smem<grad_gemm_persistent_kernel<T, G>>(smem)) return status::unsupported_arch;
  prm.queue = queue;
  if (cudaMemsetAsync(queue, 0, sizeof(int), stream) != cudaSuccess) return status::cuda_error;
  grad_gemm_persistent_kernel<T, G>
      <<<unsigned(std::min(prm.tiles(), sms)), grad_gemm_shape::threads, smem, stream>>>(prm);
  return cudaGetLastError() == cudaSuccess ? status::success : status::cuda_error;
}

// A gradient product (dE or dC) of the backward on wgmma: persistent (on at most `sms` CTAs, taking tiles through
// `queue`) where the caller gives a queue and TMA writes its tiles, else a CTA per tile; unsupported_arch when TMA
// cannot address an operand (the caller then runs the portable kernel). With `k_splits` > 1 (grad_gemm_params_sm90),
// only persistent and onto a carry that TMA adds to (k_splits / 2 carries of M x N stacked in base.acc where
// k_splits > 2, an even count); unsupported_arch otherwise.
template <class T, class G, int KTile, major MajorA, major MajorB>
status launch_grad_gemm(const grad_gemm_params<T, G, KTile>& base, cudaStream_t stream, int* queue = nullptr,
                        int sms = 0, int k_splits = 1) {
  using S = grad_gemm_shape;
  if constexpr (!tensor_core_type<T> || KTile != S::filter_bn || MajorB != major::mn) {
    return status::unsupported_arch;
  } else {
    if (base.m == 0 || base.n == 0) return status::success;
    grad_gemm_params_sm90<T, G> prm;
    if (!encode_grad_gemm<MajorA>(prm, base)) return status::unsupported_arch;
    const int tiles = prm.tiles();
    if (k_splits > 1) {
      if (queue == nullptr || prm.tma != tma_write::carry || base.first || (k_splits > 2 && k_splits % 2 != 0))
        return status::unsupported_arch;
      prm.k_splits = k_splits;
      if (k_splits > 2) {  // the map spans the stacked carries
        prm.pair_rows = int(base.m);
        if (!encode_sw128(&prm.out_map, base.acc, base.n, base.m * (k_splits / 2), base.n, tensor_map_type<float>,
                          sizeof(float), S::bm))
          return status::unsupported_arch;
      }
      grad_gemm_pair_params_sm90<T, G> single;
      (MajorA == major::k ? single.de : single.dc) = prm;
      return launch_persistent(single, queue, sms, stream);
    }
    if (queue != nullptr && prm.tma != tma_write::none) {
      grad_gemm_pair_params_sm90<T, G> single;
      (MajorA == major::k ? single.de : single.dc) = prm;
      const status st = launch_persistent(single, queue, sms, stream);
      if (st != status::unsupported_arch) return st;
    }
    constexpr std::size_t smem = S::smem_bytes<T>;
    if (!allow_dynamic_smem<grad_gemm_kernel<T, G, MajorA>>(smem)) return status::unsupported_arch;
    grad_gemm_kernel<T, G, MajorA><<<unsigned(tiles), S::threads, smem, stream>>>(prm);
    return cudaGetLastError() == cudaSuccess ? status::success : status::cuda_error;
  }
}

// The compacted walk's products (plan.hpp) for grad_gemm_persistent_kernel: de and dc of all rows and classes, whose
// A operands span the dZ slots, each live tile read at its slot (`compact`), dE in at most `parts` parts whose sums
// lie in `sums` (`sum_rows` fp32 rows of D); false where TMA cannot address the slots or the sums or write either
// output whole, or the kernel cannot have its shared memory.
template <class T, class G, int KTile>
bool prepare_compact_products(grad_gemm_pair_params_sm90<T, G>& prm, const grad_gemm_params<T, G, KTile>& de,
                              const grad_gemm_params<T, G, KTile>& dc, const compact_slots& compact, float* sums,
                              std::int64_t sum_rows, std::int64_t parts) {
  if constexpr (!tensor_core_type<T> || KTile != grad_gemm_shape::filter_bn) {
    return false;
  } else {
    if (!encode_grad_gemm<major::k>(prm.de, de) || !encode_grad_gemm<major::mn>(prm.dc, dc)) return false;
    prm.de.compact = prm.dc.compact = compact;
    prm.de.m_tiles = int(parts);
    prm.de.m_tiles_on_device = compact.walk.state + 5;
    const std::int64_t d = de.n;
    return prm.de.tma == tma_write::output && prm.dc.tma == tma_write::output && sum_rows > 0 &&
           tma_addressable(sums, d, sizeof(float)) &&
           encode_sw128(&prm.de.sums_map, sums, d, sum_rows, d, tensor_map_type<float>, sizeof(float),
                        grad_gemm_shape::bm) &&
           allow_dynamic_smem<grad_gemm_persistent_kernel<T, G>>(persistent_shape::smem_bytes<T>);
  }
}

// The products prepare_compact_products prepared, persistent on at most `sms` CTAs taking tiles through `queue`.
template <class T, class G>
status launch_compact_products(grad_gemm_pair_params_sm90<T, G>& prm, int* queue, int sms, cudaStream_t stream) {
  if constexpr (!tensor_core_type<T>) {
    return status::unsupported_arch;
  } else {
    return launch_persistent(prm, queue, sms, stream);
  }
}

// Parts of K for the upper triangle of a symmetric d x d product of depth k on `sms` SMs, with room for `carries`
// fp32 sums of d x d: 1, 2 (onto one carry) or an even count up to twice the carries (parts 2j and 2j + 1 onto
// carry j), whichever ends first counting whole rounds of the persistent queue at each part's depth over the tiles
// on and above the diagonal (phi3.5: 156 tiles, 3 rounds of half the depth against 2 of the whole; gpt2: 12 tiles,
// with five carries one round of a tenth), each part at least a filter tile of K deep.
inline int symmetric_k_splits(std::int64_t d, std::int64_t k, int sms, std::int64_t carries) {
  using S = grad_gemm_shape;
  std::int64_t tiles = 0;
  for (std::int64_t rt = 0; rt < ceil_div(d, S::bm); ++rt)
    for (std::int64_t ct = 0; ct < ceil_div(d, S::bn); ++ct) tiles += (ct + 1) * S::bn > rt * S::bm;
  const std::int64_t s = std::max(sms, 1), most = std::min<std::int64_t>({2 * carries, ceil_div(k, S::filter_bn), 16});
  int best = 1;
  double best_time = double(ceil_div(tiles, s));
  for (std::int64_t parts = 2; parts <= most; parts += 2) {
    const double time = double(ceil_div(parts * tiles, s)) / double(parts);
    if (time < best_time) {
      best = int(parts);
      best_time = time;
    }
  }
  return best;
}

// dE and dC of one dZ block in one launch: persistent (grad_gemm_persistent_kernel, on `sms` CTAs, taking tiles
// through `queue`) where TMA writes both, else grad_gemm_pair_kernel; unsupported_arch as launch_grad_gemm.
template <class T, class G, int KTile>
status launch_grad_gemm_pair(const grad_gemm_params<T, G, KTile>& de, const grad_gemm_params<T, G, KTile>& dc,
                             int* queue, int sms, cudaStream_t stream) {
  using S = grad_gemm_shape;
  if constexpr (!tensor_core_type<T> || KTile != S::filter_bn) {
    return status::unsupported_arch;
  } else {
    grad_gemm_pair_params_sm90<T, G> prm;
    if (!encode_grad_gemm<major::k>(prm.de, de) || !encode_grad_gemm<major::mn>(prm.dc, dc)) {
      return status::unsupported_arch;
    }
    const int tiles = prm.tiles();
    if (tiles == 0) return status::success;
    prm.dc_first = dc.k > de.k;
    if (queue != nullptr && prm.de.tma != tma_write::none && prm.dc.tma != tma_write::none) {
      const status st = launch_persistent(prm, queue, sms, stream);
      if (st != status::unsupported_arch) return st;
    }
    constexpr std::size_t smem = S::smem_bytes<T>;
    if (!allow_dynamic_smem<grad_gemm_pair_kernel<T, G>>(smem)) return status::unsupported_arch;
    grad_gemm_pair_kernel<T, G><<<unsigned(tiles), S::threads, smem, stream>>>(prm);
    return cudaGetLastError() == cudaSuccess ? status::success : status::cuda_error;
  }
}

}  // namespace cce::detail::sm90
