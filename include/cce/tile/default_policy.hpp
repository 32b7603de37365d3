// The tile policy used when none is named: 128 x 128 logit tiles. 16-bit types run 8 warps of 32 x 64 (4 x 2) on
// tensor cores with a 3-stage, 64-deep pipeline (96 KiB), two CTAs per SM on Hopper: four row slots per thread keep
// the forward's running statistics in registers without spilling (64 x 32 warps spill them), and 64-deep stages
// halve the barriers and loader work per MMA (H200: 15-20 % faster than 32 deep in 4 stages, docs/performance.md).
// An A100 (164 KiB per SM) holds one such CTA per SM, policy<128, 128, 32, 4, 4, 2, 2> two. sm_86 and sm_89 give a
// CTA 99 KiB: enough in every case (label smoothing and the accuracy output add 1.5 KiB of per-row state).
// fp32 runs 16 x 16 threads of 8 x 8 exact FMA with a 3-stage, 16-deep pipeline.
#pragma once

#include <type_traits>

#include <cce/tile/policy.hpp>

namespace cce::tile {

template <class T>
using default_policy_t = std::conditional_t<std::is_same_v<T, float>, policy<128, 128, 16, 3, 2, 4>,
                                            policy<128, 128, 64, 3, 4, 2, 2>>;

}  // namespace cce::tile
