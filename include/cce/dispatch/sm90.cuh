// When and how the Hopper (sm_90a) kernels replace their portable counterparts: on compute capability 9.0, for 16-bit
// inputs whose rows TMA can address (16-byte aligned base and row pitch), with the default 128 x 128 filter grid, and
// only when the program was compiled for sm_90a (an sm_80 or plain sm_90 image has no such kernel).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include <cce/dispatch/plan.hpp>
#include <cce/kernel/sm90/forward.cuh>
#include <cce/options.hpp>
#include <cce/problem.hpp>
#include <cce/status.hpp>

namespace cce::detail::sm90 {

template <class T>
inline constexpr bool tensor_core_type = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

template <class T>
CUtensorMapDataType tensor_map_type() {
  return std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

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
bool forward_available(const problem<T>& p, const plan& pl, const device_info& dev, const options& o) {
  if constexpr (!tensor_core_type<T>) {
    return false;
  } else {
    constexpr std::int64_t coordinate_limit = std::int64_t(1) << 31;  // TMA coordinates are int32
    return o.hopper_kernels && dev.arch == 90 && pl.grid.bm == forward_shape::bm &&
           pl.grid.bn == forward_shape::filter_bn && p.n < coordinate_limit && p.v < coordinate_limit &&
           p.d < coordinate_limit && tma_addressable(p.e, p.e_stride(), sizeof(T)) &&
           tma_addressable(p.c, p.c_stride(), sizeof(T)) && has_sm90a_image(forward_kernel<T>);
  }
}

template <class T>
status launch_forward(const forward_params<T>& base, cudaStream_t stream) {
  if constexpr (!tensor_core_type<T>) {
    return status::unsupported_arch;
  } else {
    forward_params_sm90<T> prm;
    prm.base = base;
    if (!encode_k_major_sw128(&prm.e_map, base.e.ptr, base.e.extent, base.e.depth, base.e.ld, tensor_map_type<T>(),
                              sizeof(T), forward_shape::bm) ||
        !encode_k_major_sw128(&prm.c_map, base.c.ptr, base.c.extent, base.c.depth, base.c.ld, tensor_map_type<T>(),
                              sizeof(T), forward_shape::bn)) {
      return status::unsupported_arch;
    }
    constexpr std::size_t smem = forward_shape::smem_bytes<T>;
    const dim3 grid(unsigned(base.grid.row_tiles()), unsigned(base.splits));
    if (cudaFuncSetAttribute(forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) !=
        cudaSuccess) {
      cudaGetLastError();
      return status::unsupported_arch;
    }
    forward_kernel<T><<<grid, forward_shape::threads, smem, stream>>>(prm);
    return cudaGetLastError() == cudaSuccess ? status::success : status::cuda_error;
  }
}

}  // namespace cce::detail::sm90
