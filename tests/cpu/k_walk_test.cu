// The gradient products' walk over the filter's live K tiles (kernel/portable/grad_gemm.cuh,
// active_k_tiles::cursor), run on the host as a producer thread runs it: every live tile once and in order, nothing
// else, along either direction of the flags and from any starting flag.
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include <cce/kernel/portable/grad_gemm.cuh>

namespace {

constexpr int k_tile = 128;  // elements of K per flag
using tiles = cce::detail::active_k_tiles<k_tile>;

// The tiles of Bk elements that walk_alone visits over k_tiles tiles from k_begin.
template <int Bk>
std::vector<int> walked(const tiles& a, std::int64_t k_begin, int k_tiles) {
  std::vector<int> seen;
  auto cursor = a.walk_alone<Bk>(k_begin, k_tiles);
  for (int t = cursor.next(0); t < k_tiles; t = cursor.next(t + 1)) seen.push_back(t);
  return seen;
}

// The same tiles, one flag at a time.
template <int Bk>
std::vector<int> live(const tiles& a, std::int64_t k_begin, int k_tiles) {
  std::vector<int> seen;
  for (int t = 0; t < k_tiles; ++t)
    if (a(k_begin + std::int64_t(t) * Bk)) seen.push_back(t);
  return seen;
}

template <int Bk>
void check_walks(std::mt19937& rng) {
  const double densities[] = {0.0, 0.01, 0.3, 0.97, 1.0};
  for (int trial = 0; trial < 100; ++trial) {
    const std::int64_t row_tiles = 1 + rng() % 7, chunk_tiles = 1 + rng() % 150;
    std::bernoulli_distribution on(densities[trial % 5]);
    std::vector<std::uint8_t> flags(row_tiles * chunk_tiles);
    for (auto& f : flags) f = on(rng) ? 1 : 0;
    for (const bool k_is_vocab : {true, false}) {
      tiles a;
      a.flags = flags.data();
      a.chunk_tiles = chunk_tiles;
      a.k_is_vocab = k_is_vocab;
      const std::int64_t fixed_tiles = k_is_vocab ? row_tiles : chunk_tiles;
      const std::int64_t along = k_is_vocab ? chunk_tiles : row_tiles;  // flags along K
      a.fixed_tile = std::int64_t(rng() % fixed_tiles);
      const std::int64_t first_flag = std::int64_t(rng() % along);
      // K ends anywhere in the last flag's tiles.
      const std::int64_t k_elems = (along - first_flag - 1) * k_tile + 1 + std::int64_t(rng() % k_tile);
      const int k_tiles = int((k_elems + Bk - 1) / Bk);
      const std::int64_t k_begin = first_flag * k_tile;
      INFO("chunk_tiles " << chunk_tiles << ", row_tiles " << row_tiles << ", k_is_vocab " << k_is_vocab
                          << ", fixed " << a.fixed_tile << ", first flag " << first_flag << ", k_tiles " << k_tiles);
      REQUIRE(walked<Bk>(a, k_begin, k_tiles) == live<Bk>(a, k_begin, k_tiles));
    }
  }
}

}  // namespace

TEST_CASE("a thread's walk visits exactly the live K tiles, in order", "[walk]") {
  std::mt19937 rng(2024);
  check_walks<64>(rng);   // two tiles per flag (the sm_90a products' k-blocks)
  check_walks<128>(rng);  // one tile per flag
  check_walks<32>(rng);   // four
}

TEST_CASE("without flags the walk visits every K tile", "[walk]") {
  const tiles every;
  for (const int k_tiles : {1, 31, 32, 33, 64, 65, 200}) {
    std::vector<int> all(k_tiles);
    for (int t = 0; t < k_tiles; ++t) all[t] = t;
    REQUIRE(walked<64>(every, 0, k_tiles) == all);
  }
}

TEST_CASE("K split in parts at whole flags: each part's walk from its first block, together every live tile once",
          "[walk]") {
  constexpr int bk = 64, per_flag = k_tile / bk;
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int k_blocks = 1 + int(rng() % 600), parts = 1 + int(rng() % 4);
    const std::int64_t flag_count = (k_blocks + per_flag - 1) / per_flag;
    std::vector<std::uint8_t> flags(static_cast<std::size_t>(flag_count));
    for (auto& f : flags) f = rng() % 3 != 0;
    tiles a;
    a.flags = flags.data();
    a.chunk_tiles = flag_count;
    INFO("k_blocks " << k_blocks << ", parts " << parts);
    std::vector<int> seen;
    int next_first = 0;
    for (int part = 0; part < parts + 1; ++part) {  // one past the last: empty
      const cce::detail::k_range r = cce::detail::k_part<k_tile, bk>(k_blocks, parts, part);
      REQUIRE(r.first == next_first);
      REQUIRE(r.first <= r.end);
      REQUIRE((r.first % per_flag == 0 || r.first == k_blocks));
      if (part == parts) REQUIRE(r.first == k_blocks);
      auto cursor = a.walk_alone<bk>(0, r.end);  // as grad_tile walks a part
      for (int t = cursor.next(r.first); t < r.end; t = cursor.next(t + 1)) seen.push_back(t);
      next_first = r.end;
    }
    REQUIRE(next_first == k_blocks);
    REQUIRE(seen == live<bk>(a, 0, k_blocks));
  }
}
