// Tensor maps for the Hopper tensor-memory-access unit (TMA): a 2-D operand whose contiguous axis is copied 128 bytes
// (64 16-bit elements) at a time, in boxes of 128 bytes x `box_rows`, with the 128-byte swizzle that wgmma descriptors
// read.
// A K-major operand (rows x depth, depth contiguous) gives boxes of `box_rows` rows of one 64-deep k-slice; an MN-major
// one (depth x extent, extent contiguous) boxes of 64 consecutive M/N elements of `box_rows` k. Encoded on the host
// (cuTensorMapEncodeTiled, reached through the runtime's driver entry point so that nothing links against libcuda)
// and passed to kernels by value as __grid_constant__ parameters.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cce::detail::sm90 {

// Elements of a 16-bit operand that fill one 128-byte swizzle row: the depth of one pipeline stage.
inline constexpr int swizzle_depth = 64;

inline bool tma_addressable(const void* ptr, std::int64_t ld_elems, std::size_t elem_bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && (ld_elems * std::int64_t(elem_bytes)) % 16 == 0;
}

// `inner` elements contiguous, `outer` rows `ld_elems` apart. Out-of-range parts of a box are filled with zeros by the
// hardware.
inline bool encode_sw128(CUtensorMap* map, const void* ptr, std::int64_t inner, std::int64_t outer,
                         std::int64_t ld_elems, CUtensorMapDataType type, std::size_t elem_bytes,
                         std::uint32_t box_rows) {
  using encode_fn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const encode_fn encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return encode_fn(nullptr);
    }
    return reinterpret_cast<encode_fn>(fn);
  }();
  if (encode == nullptr || inner <= 0 || outer <= 0) return false;
  const cuuint64_t dims[2] = {cuuint64_t(inner), cuuint64_t(outer)};
  const cuuint64_t strides[1] = {cuuint64_t(ld_elems) * elem_bytes};
  const cuuint32_t box[2] = {cuuint32_t(128 / elem_bytes), box_rows};
  const cuuint32_t unit[2] = {1, 1};
  return encode(map, type, 2, const_cast<void*>(ptr), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace cce::detail::sm90
