// Vocabulary shards for the tests: how to cut V classes into R contiguous shards, and the problem one shard holds
// (pointers into the whole problem's arrays, host or device alike).
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include <cce/problem.hpp>

namespace cce::test {

// The first class of each of `ranks` shards of `v` classes; uneven sizes, each at least one class.
inline std::vector<std::int64_t> random_cuts(std::mt19937_64& rng, std::int64_t v, int ranks) {
  std::vector<std::int64_t> inner;
  for (std::int64_t c = 1; c < v; ++c) inner.push_back(c);
  std::shuffle(inner.begin(), inner.end(), rng);
  inner.resize(std::size_t(ranks - 1));
  std::sort(inner.begin(), inner.end());
  std::vector<std::int64_t> offsets{0};
  offsets.insert(offsets.end(), inner.begin(), inner.end());
  return offsets;
}

inline std::int64_t shard_size(const std::vector<std::int64_t>& offsets, std::size_t k, std::int64_t v) {
  return (k + 1 < offsets.size() ? offsets[k + 1] : v) - offsets[k];
}

// The problem of classes [offset, offset + size) of `whole`: classifier, bias and B rows of the slice; the same
// embeddings, targets, class weights (all of them) and A.
template <class T>
problem<T> shard_of(const problem<T>& whole, std::int64_t offset, std::int64_t size) {
  problem<T> p = whole;
  p.v = size;
  p.c = whole.c + offset * whole.c_stride();
  if (whole.bias) p.bias = whole.bias + offset;
  if (whole.has_lora()) p.lora.b = whole.lora.b + offset * whole.b_stride();
  p.shard = {offset, whole.v};
  return p;
}

}  // namespace cce::test
