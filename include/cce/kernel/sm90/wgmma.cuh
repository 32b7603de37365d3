// Hopper warpgroup MMA (wgmma, sm_90a) through inline PTX: shared-memory matrix descriptors (K-major and MN-major), the
// fences that order it against ordinary register use, and the m64n256k16 product with fp32 accumulators in registers.
//
// Accumulator layout of m64nNk16 (PTX ISA, "wgmma register fragments"): warp w of the warpgroup holds rows 16w .. 16w
// + 15; lane (g = lane / 4, t = lane % 4) holds, for each n8 block j, d[4j + 0..1] = row g, columns 8j + 2t + 0..1
// and d[4j + 2..3] = row g + 8, the same columns.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace cce::detail::sm90 {

// Descriptor of a K-major operand tile stored with the 128-byte swizzle (rows of 64 16-bit elements, 8-row atoms of
// 1024 bytes, as the tensor-memory-access unit writes them). `smem` is the shared address of the k-slice to read:
// advancing by 16 elements (32 bytes) inside the atom selects the next k16 step.
__device__ __forceinline__ std::uint64_t k_major_sw128_descriptor(std::uint32_t smem) {
  constexpr std::uint64_t stride_bytes = 1024;  // between consecutive 8-row atoms
  constexpr std::uint64_t swizzle_128b = 1;
  return std::uint64_t((smem & 0x3FFFF) >> 4) | (std::uint64_t(1) << 16) | ((stride_bytes >> 4) << 32) |
         (swizzle_128b << 62);
}

// Descriptor of an MN-major operand tile stored with the 128-byte swizzle: each 128-byte row holds 64 consecutive M (or
// N) elements of one k, 8 such rows form a 1024-byte atom (8 k), and the next 64 M/N elements start `mn_stride` bytes
// further (the tensor-memory-access unit writes one such box per 64 M/N elements). `smem` is the address of the k
// row to start from: a k16 step advances it by 16 rows (2048 bytes), whole atoms.
__device__ __forceinline__ std::uint64_t mn_major_sw128_descriptor(std::uint32_t smem, std::uint32_t mn_stride) {
  constexpr std::uint64_t k_atom_bytes = 1024;  // between consecutive groups of 8 k
  constexpr std::uint64_t swizzle_128b = 1;
  // For MN-major swizzled layouts the leading offset steps along M/N and the stride offset along K (PTX ISA,
  // "Leading/Stride Dimension Byte Offset").
  return std::uint64_t((smem & 0x3FFFF) >> 4) | (std::uint64_t(mn_stride >> 4) << 16) |
         ((k_atom_bytes >> 4) << 32) | (swizzle_128b << 62);
}

// Orders this warpgroup's earlier register and shared-memory accesses before the wgmma that follow.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most `Pending` committed groups of this warpgroup are still running.
template <int Pending>
__device__ __forceinline__ void wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
// Keeps the compiler from moving accesses of `x` across the asynchronous MMA's fences and waits.
__device__ __forceinline__ void fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }

// d (+)= A(64 x 16) * B(256 x 16)^T from shared memory, each K-major or (Transposed) MN-major; accumulate = false
// overwrites d.
template <class T, bool TransposedA = false, bool TransposedB = false>
__device__ __forceinline__ void mma_m64n256k16(float (&d)[128], std::uint64_t desc_a, std::uint64_t desc_b,
                                               bool accumulate) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit operands");
#define CCE_WGMMA_M64N256K16(TYPE)                                                                                     \
    asm volatile(                                                                                                      \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                                  \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {"                                              \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                        \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "                                       \
        "%30, %31,"                                                                                                    \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "                                       \
        "%46, %47,"                                                                                                    \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "                                       \
        "%62, %63,"                                                                                                    \
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "                                       \
        "%78, %79,"                                                                                                    \
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, "                                       \
        "%94, %95,"                                                                                                    \
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "                                         \
        "%108, %109, %110, %111,"                                                                                      \
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "                                           \
        "%123, %124, %125, %126, %127"                                                                                 \
        "}, %128, %129, p, 1, 1, %131, %132;\n}\n"                                                                     \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),       \
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),      \
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),      \
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),      \
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),      \
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),      \
          "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),      \
          "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),      \
          "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),      \
          "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),      \
          "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), \
          "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),            \
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]),            \
          "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),            \
          "+f"(d[126]), "+f"(d[127])                                                                                   \
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TransposedA)), "n"(int(TransposedB)))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) CCE_WGMMA_M64N256K16("bf16");
  else CCE_WGMMA_M64N256K16("f16");
#undef CCE_WGMMA_M64N256K16
}

}  // namespace cce::detail::sm90
