// Preset for phi3_5: D = 3072, V = 32064, bf16. Measured by bench/tune/tune.py on NVIDIA H100 80GB HBM3, 2026-11-25,
// N = 8192 tokens of lm-like data, forward + chunked backward: 20.68 ms; no candidate beat the default by more than 1%;
// next best cce::tile::policy<128, 128, 32, 4, 2, 4, 2, 8>: 20.74 ms.
// Since 2026-12-01 the tile is 64 deep in 3 stages with 4 x 2 warps, as in the default policy: the portable
// kernels' faster form (docs/performance.md); the sm_90a kernels depend only on the 128 x 128 tile and the split.
#pragma once

#include <cce/options.hpp>
#include <cce/tile/policy.hpp>

namespace cce::presets {

using phi3_5 = cce::tile::policy<128, 128, 64, 3, 4, 2, 2, 16>;

// The options phi3_5 is trained with (the defaults).
inline options phi3_5_options() {
  options o;
  return o;
}

}  // namespace cce::presets
