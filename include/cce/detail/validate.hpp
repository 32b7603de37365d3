// Host-side argument checks shared by every executor: they run before any launch, so a bad argument returns a
// status and nothing is read or written.
#pragma once

#include <cmath>
#include <cstdint>

#include <cce/detail/math.hpp>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>

namespace cce::detail {

inline status validate_options(const options& o) {
  const auto finite = [](float x) { return std::isfinite(x); };
  // An enum outside its values would leave outputs unwritten (e.g. a loss with no reduction to write it).
  if (int(o.reduction) < int(reduction::none) || int(o.reduction) > int(reduction::mean) ||
      int(o.filter) < int(filter_mode::none) || int(o.filter) > int(filter_mode::threshold) ||
      int(o.accum) < int(accumulation::fp32) || int(o.accum) > int(accumulation::kahan) ||
      int(o.backward_mode) < int(backward_mode::automatic) ||
      int(o.backward_mode) > int(backward_mode::loss_and_grad)) {
    return status::invalid_option;
  }
  if (!finite(o.temperature) || o.temperature <= 0.f) return status::invalid_option;
  if (!finite(o.softcap) || o.softcap < 0.f) return status::invalid_option;
  if (!(o.label_smoothing >= 0.f && o.label_smoothing <= 1.f)) return status::invalid_option;
  if (!finite(o.z_loss) || o.z_loss < 0.f) return status::invalid_option;
  if (o.filter == filter_mode::threshold && !(o.filter_eps >= 0.f && o.filter_eps < 1.f)) {
    return status::invalid_option;
  }
  if (!(o.uniform_tolerance >= 0.f && o.uniform_tolerance < 1.f)) return status::invalid_option;
  if (o.shift < 0) return status::invalid_option;
  return status::success;
}

template <class T>
status validate_problem(const problem<T>& p, const options& o) {
  if (status s = validate_options(o); s != status::success) return s;
  if (p.targets_type != target_type::int32 && p.targets_type != target_type::int64) return status::unsupported_dtype;
  if (p.n < 0 || p.d < 1 || p.v < 1 || p.lora.rank < 0) return status::invalid_size;
  if (p.total_classes() > INT32_MAX - 1) return status::invalid_size;  // class indices travel as int32 in kernels
  if (p.shard.global_v != 0 && (p.shard.offset < 0 || p.shard.offset > p.shard.global_v - p.v)) {
    return status::invalid_size;
  }
  if (p.shard.global_v == 0 && p.shard.offset != 0) return status::invalid_size;
  if (o.shift > 0 && (p.seq_len < 1 || p.n % p.seq_len != 0)) return status::invalid_size;
  if (p.n > 0 && (p.e == nullptr || p.targets == nullptr)) return status::null_pointer;
  if (p.c == nullptr) return status::null_pointer;
  if (p.has_lora() && (p.lora.a == nullptr || p.lora.b == nullptr)) return status::null_pointer;
  if (p.e_stride() < p.d || p.c_stride() < p.d) return status::invalid_stride;
  if (p.has_lora() && (p.a_stride() < p.d || p.b_stride() < p.lora.rank)) return status::invalid_stride;
  const std::size_t target_bytes = p.targets_type == target_type::int32 ? 4 : 8;
  if (!aligned_to(p.e, sizeof(T)) || !aligned_to(p.c, sizeof(T)) || !aligned_to(p.bias, sizeof(T)) ||
      !aligned_to(p.targets, target_bytes) || !aligned_to(p.class_weights, sizeof(float)) ||
      !aligned_to(p.lora.a, sizeof(T)) || !aligned_to(p.lora.b, sizeof(T))) {
    return status::misaligned_pointer;
  }
  return status::success;
}

// The 16-byte vector path addresses a tile's vectors by 32-bit byte offsets from the tile's origin (operand.cuh):
// leading dimensions up to max_vector_ld elements keep tiles of up to max_vector_tile_rows rows within 4 GiB.
constexpr int max_vector_tile_rows = 512;
template <class T>
constexpr std::int64_t max_vector_ld = (std::int64_t(1) << 32) / (max_vector_tile_rows * std::int64_t(sizeof(T))) - 1;

// The 16-byte vector path: every row of E and C starts on a 16-byte boundary, D is whole vectors and the strides
// fit the loader's offsets.
template <class T>
bool vectorizable(const problem<T>& p) {
  constexpr std::int64_t vec = 16 / sizeof(T);
  return aligned_to(p.e, 16) && aligned_to(p.c, 16) && p.d % vec == 0 && p.e_stride() % vec == 0 &&
         p.c_stride() % vec == 0 && p.e_stride() <= max_vector_ld<T> && p.c_stride() <= max_vector_ld<T>;
}

inline status validate_buffer(const void* p, std::size_t have, std::size_t need) {
  if (need == 0) return status::success;
  if (p == nullptr) return status::null_pointer;
  if (have < need) return status::workspace_too_small;
  if (!aligned_to(p, 256)) return status::misaligned_pointer;
  return status::success;
}

template <class T, class G>
status validate_gradients(const problem<T>& p, const gradients<G>& g) {
  if ((g.ld_de && g.ld_de < p.d) || (g.ld_dc && g.ld_dc < p.d)) return status::invalid_stride;
  if ((g.da || g.db) && !p.has_lora()) return status::invalid_option;
  if (g.dbias && !p.bias) return status::invalid_option;
  for (const void* q : {static_cast<const void*>(g.de), static_cast<const void*>(g.dc),
                        static_cast<const void*>(g.dbias), static_cast<const void*>(g.da),
                        static_cast<const void*>(g.db)}) {
    if (!aligned_to(q, sizeof(G))) return status::misaligned_pointer;
  }
  if (!aligned_to(g.filter_tiles, sizeof(std::int64_t))) return status::misaligned_pointer;
  return status::success;
}

}  // namespace cce::detail
