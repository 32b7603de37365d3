// 05_vocab_sorting: how much of the backward the gradient filter skips, with and without options::vocab_sort, on a
// word-level model of real English text.
//
// The gradient filter skips a (128 rows x 128 classes) tile of the backward when the softmax mass of those classes
// is negligible for every one of the rows. In a trained language model most of a row's mass sits on a few
// thousand frequent words, but a vocabulary in alphabetical (or first-seen, or tokenizer-merge) order scatters
// them over nearly every tile, so few tiles are skippable. vocab_sort orders the classes by their average logit
// over the batch before the backward, which packs the frequent words into the first tiles.
//
// The program reads a text (data/corpus.txt of scripts/fetch_corpus.sh: the King James Bible and the fortune
// collection, about 1.2 million words), builds its word vocabulary in alphabetical order (every word, about 38,000)
// and a bigram model whose softmax is realistic without training:
//
//   logit(next = v | previous = w) = b_v + e_w . c_v,   b_v = beta * log p(v)       (unigram frequencies)
//   e_w = alpha * r_w,   c_v = mean of r_u over the words u seen just before v        (r_u random, unit length)
//
// so e_w . c_v ~ alpha * P(previous = w | next = v): a naive-Bayes bigram over a Zipf prior. beta = 2 (default)
// sharpens the prior the way a trained model's logits push rare words far below frequent ones; beta = 1 is the
// plain unigram prior, whose softmax is too flat for any tile to be negligible. Then it runs forward
// and backward (bf16, default filter) on N consecutive positions of the text, once unsorted and once sorted, and
// prints the loss, the tiles computed and skipped (gradients::filter_tiles) and the backward time. Without a GPU it
// runs the same blockwise algorithm on the CPU (cce::host::tiled_executor) at a reduced N and D.
//
//   ./scripts/fetch_corpus.sh
//   cmake -B build -G Ninja && cmake --build build --target 05_vocab_sorting
//   ./build/examples/05_vocab_sorting/05_vocab_sorting data/corpus.txt [beta [alpha]]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include <cce/cce.cuh>
#include <cce/host/tiled_executor.hpp>

namespace {

using bf16 = __nv_bfloat16;

#define CHECK_CUDA(x)                                                      \
  do {                                                                     \
    const cudaError_t e_ = (x);                                            \
    if (e_ != cudaSuccess) {                                               \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

void check(cce::status s, const char* what) {
  if (s != cce::status::success) {
    std::fprintf(stderr, "%s: %s\n", what, cce::to_string(s));
    std::exit(1);
  }
}

// The text as word ids of an alphabetical vocabulary (lower case; letters and apostrophes make words).
struct text {
  std::vector<std::string> vocab;
  std::vector<std::int32_t> words;
};

text read_words(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s (scripts/fetch_corpus.sh writes data/corpus.txt)\n", path);
    std::exit(1);
  }
  std::vector<std::string> tokens;
  std::string word;
  for (char ch; in.get(ch);) {
    const char lower = (ch >= 'A' && ch <= 'Z') ? char(ch - 'A' + 'a') : ch;
    if ((lower >= 'a' && lower <= 'z') || (lower == '\'' && !word.empty())) {
      word += lower;
    } else if (!word.empty()) {
      tokens.push_back(word);
      word.clear();
    }
  }
  if (!word.empty()) tokens.push_back(word);
  text t;
  t.vocab = tokens;
  std::sort(t.vocab.begin(), t.vocab.end());
  t.vocab.erase(std::unique(t.vocab.begin(), t.vocab.end()), t.vocab.end());
  std::unordered_map<std::string, std::int32_t> id;
  for (std::size_t i = 0; i < t.vocab.size(); ++i) id[t.vocab[i]] = std::int32_t(i);
  for (const std::string& w : tokens) t.words.push_back(id[w]);
  return t;
}

// The bigram model of the header, and N positions of the text: row i is the context word, target the next one.
struct model {
  std::int64_t n = 0, d = 0, v = 0;
  std::vector<bf16> e, c, bias;
  std::vector<std::int64_t> targets;
};

model make_model(const text& t, std::int64_t n, std::int64_t d, float beta, float alpha) {
  model m;
  m.n = n;
  m.d = d;
  m.v = std::int64_t(t.vocab.size());
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(float(d)));
  std::vector<float> r(std::size_t(m.v * d)), c(std::size_t(m.v * d), 0.f);
  for (float& x : r) x = normal(rng);
  std::vector<double> count(std::size_t(m.v), 0.0);
  for (std::size_t i = 1; i < t.words.size(); ++i) {
    const std::int64_t prev = t.words[i - 1], next = t.words[i];
    count[std::size_t(next)] += 1.0;
    for (std::int64_t k = 0; k < d; ++k) c[std::size_t(next * d + k)] += r[std::size_t(prev * d + k)];
  }
  const double total = double(t.words.size());
  for (std::int64_t v = 0; v < m.v; ++v) {
    const double cnt = std::max(count[std::size_t(v)], 1.0);
    for (std::int64_t k = 0; k < d; ++k) m.c.push_back(__float2bfloat16(float(c[std::size_t(v * d + k)] / cnt)));
    m.bias.push_back(__float2bfloat16(beta * float(std::log(cnt / total))));
  }
  // N consecutive positions from the middle of the text (the Bible's prophets, or the fortunes when it is short).
  const std::size_t start = t.words.size() > std::size_t(2 * n + 2) ? t.words.size() / 2 : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::size_t pos = (start + std::size_t(i)) % (t.words.size() - 1);
    const std::int64_t w = t.words[pos];
    for (std::int64_t k = 0; k < d; ++k) m.e.push_back(__float2bfloat16(alpha * r[std::size_t(w * d + k)]));
    m.targets.push_back(t.words[pos + 1]);
  }
  return m;
}

struct result {
  float loss = 0.f;
  std::int64_t tiles[2] = {0, 0};  // computed, skipped
  double backward_ms = 0.0;
};

void report(const char* name, const result& r) {
  const double all = double(r.tiles[0] + r.tiles[1]);
  std::printf("  %-9s loss %.4f   tiles computed %7lld  skipped %7lld (%5.1f%%)   backward %9.3f ms\n", name, r.loss,
              (long long)r.tiles[0], (long long)r.tiles[1], all > 0 ? 100.0 * double(r.tiles[1]) / all : 0.0,
              r.backward_ms);
}

cce::problem<bf16> view(const model& m, const bf16* e, const bf16* c, const bf16* bias, const std::int64_t* y) {
  cce::problem<bf16> p;
  p.n = m.n;
  p.d = m.d;
  p.v = m.v;
  p.e = e;
  p.c = c;
  p.bias = bias;
  p.targets = y;
  return p;
}

template <class U>
U* upload(const std::vector<U>& h) {
  U* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, h.size() * sizeof(U)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice));
  return d;
}

result run_on_gpu(const model& m, bool sorted) {
  bf16 *e = upload(m.e), *c = upload(m.c), *bias = upload(m.bias), *de, *dc, *dbias;
  std::int64_t* y = upload(m.targets);
  float* loss;
  std::int64_t* tiles;
  CHECK_CUDA(cudaMalloc(&de, m.e.size() * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&dc, m.c.size() * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&dbias, m.bias.size() * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&loss, sizeof(float)));
  CHECK_CUDA(cudaMalloc(&tiles, 2 * sizeof(std::int64_t)));
  const cce::problem<bf16> p = view(m, e, c, bias, y);
  cce::options opts;  // default: mean, filter automatic
  opts.vocab_sort = sorted;
  const cce::linear_cross_entropy<bf16> op{opts};
  cce::device_info dev;
  check(cce::current_device(dev), "device");
  const std::size_t saved_bytes = op.saved_bytes(p), work_bytes = op.workspace_bytes(p, dev);
  void *saved, *work;
  CHECK_CUDA(cudaMalloc(&saved, saved_bytes));
  CHECK_CUDA(cudaMalloc(&work, work_bytes));
  cce::forward_outputs out;
  out.loss = loss;
  cce::gradients<bf16> grads;
  grads.de = de;
  grads.dc = dc;
  grads.dbias = dbias;
  grads.filter_tiles = tiles;
  check(op.forward(p, out, saved, saved_bytes, work, work_bytes), "forward");
  cudaEvent_t t0, t1;
  CHECK_CUDA(cudaEventCreate(&t0));
  CHECK_CUDA(cudaEventCreate(&t1));
  check(op.backward(p, {}, grads, saved, saved_bytes, work, work_bytes), "backward");  // warm-up
  constexpr int reps = 5;
  CHECK_CUDA(cudaEventRecord(t0));
  for (int i = 0; i < reps; ++i) check(op.backward(p, {}, grads, saved, saved_bytes, work, work_bytes), "backward");
  CHECK_CUDA(cudaEventRecord(t1));
  CHECK_CUDA(cudaEventSynchronize(t1));
  result r;
  float ms = 0.f;
  CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
  r.backward_ms = double(ms) / reps;
  CHECK_CUDA(cudaMemcpy(&r.loss, loss, sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(r.tiles, tiles, 2 * sizeof(std::int64_t), cudaMemcpyDeviceToHost));
  for (void* ptr : {static_cast<void*>(e), static_cast<void*>(c), static_cast<void*>(bias), static_cast<void*>(de),
                    static_cast<void*>(dc), static_cast<void*>(dbias), static_cast<void*>(y), static_cast<void*>(loss),
                    static_cast<void*>(tiles), saved, work}) {
    CHECK_CUDA(cudaFree(ptr));
  }
  CHECK_CUDA(cudaEventDestroy(t0));
  CHECK_CUDA(cudaEventDestroy(t1));
  return r;
}

result run_on_cpu(const model& m, bool sorted) {
  const cce::problem<bf16> p = view(m, m.e.data(), m.c.data(), m.bias.data(), m.targets.data());
  cce::options opts;
  opts.vocab_sort = sorted;
  const cce::host::tiled_executor<bf16> ex(opts, 128, 128);  // the GPU's tile grid
  const std::size_t saved_bytes = ex.saved_bytes(p), work_bytes = ex.workspace_bytes(p);
  std::vector<std::max_align_t> saved(saved_bytes / sizeof(std::max_align_t) + 64),
      work(work_bytes / sizeof(std::max_align_t) + 64);
  auto aligned = [](std::vector<std::max_align_t>& v) {
    const auto a = reinterpret_cast<std::uintptr_t>(v.data());
    return reinterpret_cast<void*>((a + 255) / 256 * 256);
  };
  result r;
  cce::forward_outputs out;
  out.loss = &r.loss;
  std::vector<bf16> de(m.e.size()), dc(m.c.size()), dbias(m.bias.size());
  cce::gradients<bf16> grads;
  grads.de = de.data();
  grads.dc = dc.data();
  grads.dbias = dbias.data();
  grads.filter_tiles = r.tiles;
  check(ex.forward(p, out, aligned(saved), saved_bytes, aligned(work), work_bytes), "forward");
  const auto t0 = std::chrono::steady_clock::now();
  check(ex.backward(p, {}, grads, aligned(saved), saved_bytes, aligned(work), work_bytes), "backward");
  r.backward_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "data/corpus.txt";
  const text t = read_words(path);
  int devices = 0;
  const bool gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  if (!gpu) cudaGetLastError();
  // GPU: a training batch; CPU: enough rows for a few row tiles and a small hidden size.
  const std::int64_t n = gpu ? 8192 : 512, d = gpu ? 256 : 32;
  const float beta = argc > 2 ? float(std::atof(argv[2])) : 2.f, alpha = argc > 3 ? float(std::atof(argv[3])) : 3.f;
  const model m = make_model(t, n, d, beta, alpha);
  std::printf("%s: %zu words, vocabulary of %lld words in alphabetical order; N = %lld positions, D = %lld, bf16\n",
              path, t.words.size(), (long long)m.v, (long long)n, (long long)d);
  std::printf("model: bias = %.2f log p(v), context scale %.1f\n", double(beta), double(alpha));
  if (gpu) {
    cce::device_info dev;
    check(cce::current_device(dev), "device");
    std::printf("GPU sm_%d, %d SMs; backward time is the mean of 5 calls\n", dev.arch, dev.sm_count);
  } else {
    std::printf("no GPU: the CPU tiled executor runs the blockwise algorithm (128 x 128 tiles, CPU time)\n");
  }
  const result plain = gpu ? run_on_gpu(m, false) : run_on_cpu(m, false);
  const result sorted = gpu ? run_on_gpu(m, true) : run_on_cpu(m, true);
  report("unsorted", plain);
  report("sorted", sorted);
  return 0;
}
