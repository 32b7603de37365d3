// Tile policies as types: the block shape of the logit tile (rows x vocab x depth), the software-pipeline depth,
// the warp layout and how finely the forward splits the vocabulary. Kernels derive everything else from these
// constants; include/cce/presets/ holds the ones measured best per model.
#pragma once

namespace cce::tile {

template <int RowsPerTile, int ColsPerTile, int DepthPerStage, int Stages, int WarpsM, int WarpsN,
          int MinBlocksPerSM = 1, int ForwardCtasPerSM = 16>
struct policy {
  static constexpr int bm = RowsPerTile;      // rows (tokens) per tile
  static constexpr int bn = ColsPerTile;      // vocab classes per tile
  static constexpr int bk = DepthPerStage;    // hidden-size slice per pipeline stage
  static constexpr int stages = Stages;       // cp.async pipeline depth
  static constexpr int warps_m = WarpsM;
  static constexpr int warps_n = WarpsN;
  static constexpr int warps = WarpsM * WarpsN;
  static constexpr int min_blocks = MinBlocksPerSM;  // resident CTAs per SM the register budget must allow
  // The forward splits the vocabulary until its grid holds about this many CTAs per SM: more splits shorten the
  // last partial wave, fewer keep each CTA's run of vocabulary tiles long and the partials small.
  static constexpr int forward_ctas_per_sm = ForwardCtasPerSM;
  static constexpr int threads = warps * 32;
  static constexpr int warp_m = bm / warps_m;  // rows per warp
  static constexpr int warp_n = bn / warps_n;  // cols per warp

  static_assert(bm % (16 * warps_m) == 0, "each warp covers whole m16 fragments");
  static_assert(bn % (16 * warps_n) == 0, "each warp covers whole n16 fragment pairs");
  static_assert(bk % 16 == 0 && bk >= 16, "the depth slice is a multiple of the mma k");
  static_assert(stages >= 2, "cp.async needs at least double buffering");
  static_assert(forward_ctas_per_sm >= 1, "the forward grid covers every SM");
};

}  // namespace cce::tile
