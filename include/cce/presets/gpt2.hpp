// Preset for gpt2: D = 768, V = 50304, bf16. Measured by bench/tune/tune.py on NVIDIA H100 80GB HBM3, 2026-11-25,
// N = 8192 tokens of lm-like data, forward + chunked backward: 10.41 ms; no candidate beat the default by more than 1%;
// next best cce::tile::policy<128, 128, 32, 4, 4, 2, 2, 16>: 10.40 ms.
// Since 2026-12-01 the tile is 64 deep in 3 stages with 4 x 2 warps, as in the default policy: the portable
// kernels' faster form (docs/performance.md); the sm_90a kernels depend only on the 128 x 128 tile and the split.
#pragma once

#include <cce/options.hpp>
#include <cce/tile/policy.hpp>

namespace cce::presets {

using gpt2 = cce::tile::policy<128, 128, 64, 3, 4, 2, 2, 16>;

// The options gpt2 is trained with:
inline options gpt2_options() {
  options o;
  o.softcap = 30.0f;
  return o;
}

}  // namespace cce::presets
