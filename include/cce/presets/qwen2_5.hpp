// Preset for qwen2_5: D = 3584, V = 152064, bf16. Measured by bench/tune/tune.py on NVIDIA H100 80GB HBM3, 2026-11-25,
// N = 8192 tokens of lm-like data, forward + chunked backward: 122.42 ms; no candidate beat the default by more than 1%;
// next best cce::tile::policy<128, 128, 32, 4, 4, 2, 2, 16>: 122.57 ms.
// Warps 4 x 2 (was 2 x 4) since 2026-12-01, as in the default policy: the portable kernels' faster layout
// (docs/performance.md); the sm_90a kernels do not depend on it.
#pragma once

#include <cce/options.hpp>
#include <cce/tile/policy.hpp>

namespace cce::presets {

using qwen2_5 = cce::tile::policy<128, 128, 32, 4, 4, 2, 2, 16>;

// The options qwen2_5 is trained with (the defaults).
inline options qwen2_5_options() {
  options o;
  return o;
}

}  // namespace cce::presets
