// 03_cuda_trainer: a word-level language model trained in plain C++/CUDA, with cce computing the output layer.
//
// The program reads an English text (by default data/corpus.txt: the King James Bible and the Debian fortunes,
// written by scripts/fetch_corpus.sh), splits it into lower-case words and keeps the 32,767 most frequent plus
// <unk>: V = 32,768 classes. The model predicts each word from the K = 4 words before it:
//
//   E_i = (1/K) Σ_j emb_j[word_{i-j}]     one D-wide table per context position, D = 256, E in bf16
//   loss = cross-entropy of softcap_30(E Cᵀ)   C: an untied V x D head, zero-initialised, bf16 copy of fp32 weights
//
// cce computes the loss and dE, dC without forming the N x V logits; dE flows back into the embedding tables;
// Adam updates the fp32 master weights and refreshes the bf16 copies cce reads. Words outside the vocabulary are
// ignored as targets (ignore_index). Every `check` steps the program materialises the logits (Z = E Cᵀ with
// softcap, in fp32) and its own log-softmax, and exits with 1 unless cce's loss agrees within a bound derived from
// D, the arithmetic's unit roundoff and the inputs.
//
// Usage:  03_cuda_trainer [corpus = data/corpus.txt] [steps = 500] [batch tokens = 8192] [check = 100]
//
// Each step prints its loss, tokens/s, the device memory in use and cce's workspace. Without a GPU the program
// runs 4 steps of 64 tokens with D = 32 on the CPU (cce's tiled executor, the same blockwise algorithm), checking
// every step.
//
//   cmake -B build -G Ninja && cmake --build build --target 03_cuda_trainer
//   ./build/examples/03_cuda_trainer/03_cuda_trainer data/corpus.txt 500 8192 100
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "example.cuh"

namespace {

using bf16 = __nv_bfloat16;
using example::buffer;
using example::check;
using example::for_each;

constexpr int kContext = 4;             // previous words the model sees
constexpr std::int64_t kVocab = 32768;  // 32,767 words + <unk>
constexpr std::int32_t kUnknown = 0;    // id of <unk>
constexpr std::int32_t kIgnore = -100;  // cce's default ignore_index
constexpr float kSoftcap = 30.f;
constexpr float kLearningRate = 3e-3f;

struct settings {
  std::string corpus = "data/corpus.txt";
  std::int64_t steps = 500, batch = 8192, check = 100, d = 256;
};

// ---------------------------------------------------------------------------------------------------------------
// Corpus: words are runs of letters, digits and apostrophes, lower-cased, without leading or trailing apostrophes.

struct corpus {
  std::vector<std::int32_t> tokens;  // word ids, kUnknown outside the vocabulary
  std::vector<std::string> words;    // id -> word
  std::int64_t distinct = 0, unknown = 0;
};

bool load_corpus(const std::string& path, std::int64_t vocab, corpus& out) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return false;
  std::stringstream text;
  text << file.rdbuf();

  // Every distinct word gets a provisional id in order of appearance; ranks by frequency come after counting.
  std::unordered_map<std::string, std::int32_t> first_id;
  std::vector<std::string> seen;
  std::vector<std::int64_t> count;
  std::vector<std::int32_t> stream;
  std::string word;
  auto flush = [&] {
    const auto b = word.find_first_not_of('\''), e = word.find_last_not_of('\'');
    if (b != std::string::npos) {
      const std::string w = word.substr(b, e - b + 1);
      const auto [it, fresh] = first_id.try_emplace(w, std::int32_t(seen.size()));
      if (fresh) {
        seen.push_back(w);
        count.push_back(0);
      }
      ++count[std::size_t(it->second)];
      stream.push_back(it->second);
    }
    word.clear();
  };
  for (const char ch : text.str()) {
    const auto u = static_cast<unsigned char>(ch);
    if (std::isalnum(u) || ch == '\'') {
      word.push_back(char(std::tolower(u)));
    } else {
      flush();
    }
  }
  flush();

  // The most frequent words (ties alphabetical, so the vocabulary is reproducible) get ids 1..vocab-1.
  std::vector<std::int32_t> order(seen.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = std::int32_t(i);
  std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    return count[std::size_t(a)] != count[std::size_t(b)] ? count[std::size_t(a)] > count[std::size_t(b)]
                                                          : seen[std::size_t(a)] < seen[std::size_t(b)];
  });
  std::vector<std::int32_t> final_id(seen.size(), kUnknown);
  out.words = {"<unk>"};
  for (std::size_t r = 0; r < order.size() && std::int64_t(r) + 1 < vocab; ++r) {
    final_id[std::size_t(order[r])] = std::int32_t(r + 1);
    out.words.push_back(seen[std::size_t(order[r])]);
  }
  out.tokens.resize(stream.size());
  for (std::size_t i = 0; i < stream.size(); ++i) {
    out.tokens[i] = final_id[std::size_t(stream[i])];
    out.unknown += out.tokens[i] == kUnknown;
  }
  out.distinct = std::int64_t(seen.size());
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// The model's own kernels: functors that run as CUDA kernels or host loops (example::for_each).

// A counter-based random number (splitmix64's finaliser): any thread draws its own without shared state.
__host__ __device__ inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Row i of the batch: a random corpus position t, its K preceding words and the target word at t.
struct sample_batch {
  const std::int32_t* tokens;
  std::int64_t count;
  std::uint64_t seed;
  std::int32_t* context;  // N x K
  std::int32_t* targets;  // N
  __host__ __device__ void operator()(std::int64_t i) const {
    const std::int64_t t = kContext + std::int64_t(mix(seed ^ mix(std::uint64_t(i))) % std::uint64_t(count - kContext));
    for (int j = 0; j < kContext; ++j) context[i * kContext + j] = tokens[t - 1 - j];
    targets[i] = tokens[t] == kUnknown ? kIgnore : tokens[t];  // <unk> is not a word worth predicting
  }
};

// E_i = mean of the context words' embeddings (table j for the word j + 1 positions back), rounded to bf16 once.
struct embed {
  const float* emb;  // K tables of V x D
  const std::int32_t* context;
  std::int64_t v, d;
  bf16* e;  // N x D
  __host__ __device__ void operator()(std::int64_t idx) const {
    const std::int64_t i = idx / d, k = idx % d;
    float s = 0.f;
    for (int j = 0; j < kContext; ++j) s += emb[(j * v + context[i * kContext + j]) * d + k];
    e[idx] = __float2bfloat16(s / kContext);
  }
};

// The embedding step's backward: each context word's row receives dE_i / K (rows repeat, hence the atomic add).
struct embed_backward {
  const float* de;  // N x D, from cce
  const std::int32_t* context;
  std::int64_t v, d;
  float* grad;  // K tables of V x D
  __host__ __device__ void operator()(std::int64_t idx) const {
    const std::int64_t i = idx / d, k = idx % d;
    const float g = de[idx] / kContext;
    for (int j = 0; j < kContext; ++j) example::add_to(&grad[(j * v + context[i * kContext + j]) * d + k], g);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The materialised loss that cce avoids: all N x V logits in fp32, then a float64 log-softmax per row.

// Work item idx is logit (i, col) of a 16 x 16 tile, tiles in row-major order: a 256-thread block computes one
// tile, so its threads share 16 rows of E and 16 of C through the L1 cache instead of each fetching its own.
struct materialise_logits {
  const bf16 *e, *c;
  std::int64_t n, v, d;
  float* z;  // N x V
  static constexpr std::int64_t tile = 16;
  static std::int64_t items(std::int64_t n, std::int64_t v) {
    return (n + tile - 1) / tile * ((v + tile - 1) / tile) * tile * tile;
  }
  __host__ __device__ void operator()(std::int64_t idx) const {
    const std::int64_t t = idx / (tile * tile), local = idx % (tile * tile), col_tiles = (v + tile - 1) / tile;
    const std::int64_t i = t / col_tiles * tile + local / tile, col = t % col_tiles * tile + local % tile;
    if (i >= n || col >= v) return;
    float s = 0.f;
    for (std::int64_t k = 0; k < d; ++k) s += __bfloat162float(e[i * d + k]) * __bfloat162float(c[col * d + k]);
    z[i * v + col] = kSoftcap * std::tanh(s / kSoftcap);
  }
};

struct row_loss {
  const float* z;
  const std::int32_t* targets;
  std::int64_t v;
  double* loss;  // N: lse - z_y, 0 for ignored rows
  __host__ __device__ void operator()(std::int64_t i) const {
    const std::int32_t y = targets[i];
    if (y == kIgnore) {
      loss[i] = 0.0;
      return;
    }
    const float* row = z + i * v;
    double m = row[0], s = 0.0;
    for (std::int64_t col = 1; col < v; ++col) m = row[col] > m ? row[col] : m;
    for (std::int64_t col = 0; col < v; ++col) s += std::exp(double(row[col]) - m);
    loss[i] = m + std::log(s) - double(row[y]);
  }
};

// Euclidean norms of n rows of width d (they bound each logit's rounding error, see check_loss).
struct row_norms {
  const bf16* x;
  std::int64_t d;
  double* norm;
  __host__ __device__ void operator()(std::int64_t i) const {
    double s = 0.0;
    for (std::int64_t k = 0; k < d; ++k) s += double(__bfloat162float(x[i * d + k])) * __bfloat162float(x[i * d + k]);
    norm[i] = std::sqrt(s);
  }
};

// cce's loss against the materialised one. Bound: a materialised logit is an fp32 dot product of D terms, off by at
// most D·u·Σ_k |e_k c_k| ≤ D·u·|e_i|·max_v |c_v| (u = 2⁻²⁴; Cauchy–Schwarz), plus a few units of roundoff of tanh at
// the softcap's scale (its slope is ≤ 1); a row's loss lse − z_y moves by at most twice one logit's error, and the
// float64 log-softmax adds nothing visible. cce's loss is within 1e-5 relative of the exact value of its rounded
// inputs (docs/testing.md); we allow twice that.
bool check_loss(bool gpu, std::int64_t step, float cce_loss, const buffer<bf16>& e, const buffer<bf16>& c,
                const buffer<std::int32_t>& targets, std::int64_t n, std::int64_t v, std::int64_t d) {
  buffer<float> z(gpu, std::size_t(n * v));
  buffer<double> loss(gpu, std::size_t(n)), e_norm(gpu, std::size_t(n)), c_norm(gpu, std::size_t(v));
  for_each(gpu, materialise_logits::items(n, v), materialise_logits{e.get(), c.get(), n, v, d, z.get()});
  for_each(gpu, n, row_loss{z.get(), targets.get(), v, loss.get()});
  for_each(gpu, n, row_norms{e.get(), d, e_norm.get()});
  for_each(gpu, v, row_norms{c.get(), d, c_norm.get()});
  const std::vector<double> rows = loss.download(), en = e_norm.download(), cn = c_norm.download();
  const std::vector<std::int32_t> y = targets.download();

  const double u = std::ldexp(1.0, -24), c_max = *std::max_element(cn.begin(), cn.end());
  double sum = 0.0, bound = 0.0;
  std::int64_t kept = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (y[std::size_t(i)] == kIgnore) continue;
    ++kept;
    sum += rows[std::size_t(i)];
    bound += 2.0 * (double(d) * u * en[std::size_t(i)] * c_max + 4.0 * u * kSoftcap);
  }
  const double reference = sum / double(kept), tol = 2e-5 * std::abs(reference) + bound / double(kept);
  const double diff = std::abs(double(cce_loss) - reference);
  const bool ok = diff <= tol;  // false for NaN too
  std::printf(
      "check at step %lld: cce %.6f, materialised %.6f (%lld rows, %.0f MiB of fp32 logits), |diff| %.2e %s "
      "tolerance %.2e: %s\n",
      (long long)step, cce_loss, reference, (long long)kept, double(z.bytes()) / (1 << 20), diff, ok ? "<=" : ">", tol,
      ok ? "ok" : "FAILED");
  return ok;
}

// ---------------------------------------------------------------------------------------------------------------

std::string memory_in_use(bool gpu) {
  if (!gpu) return "host run";
  std::size_t free_bytes = 0, total = 0;
  example::check_cuda(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo");
  char text[64];
  std::snprintf(text, sizeof(text), "%.0f MiB in use", double(total - free_bytes) / (1 << 20));
  return text;
}

int train(const settings& s, bool gpu, const corpus& text) {
  const std::int64_t n = s.batch, d = s.d, v = std::int64_t(text.words.size());
  const auto count = std::int64_t(text.tokens.size());
  buffer<std::int32_t> tokens(gpu, text.tokens.size()), context(gpu, std::size_t(n * kContext)),
      targets(gpu, std::size_t(n));
  tokens.upload(text.tokens);

  // Parameters: fp32 master weights (the head starts at zero, as untied heads often do) and the bf16 copy of C.
  const auto emb_size = std::size_t(kContext * v * d), head_size = std::size_t(v * d);
  buffer<float> emb(gpu, emb_size), emb_grad(gpu, emb_size), head(gpu, head_size), head_grad(gpu, head_size);
  buffer<bf16> head16(gpu, head_size), e(gpu, std::size_t(n * d));
  buffer<float> de(gpu, std::size_t(n * d)), loss(gpu, 1);
  {
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<float> init(emb_size);
    for (float& x : init) x = normal(rng);
    emb.upload(init);
  }
  example::adam emb_opt(gpu, emb_size, kLearningRate), head_opt(gpu, head_size, kLearningRate);

  cce::options opts;
  opts.softcap = kSoftcap;
  opts.ignore_index = kIgnore;
  const example::loss_fn<bf16> fn(gpu, opts);
  cce::problem<bf16> p;
  p.n = n;
  p.d = d;
  p.v = v;
  p.e = e.get();
  p.c = head16.get();
  p.targets = targets.get();
  p.targets_type = cce::target_type::int32;
  // The default budget (256 MiB) selects the chunked backward; a smaller one would select `minimal`.
  const std::size_t saved_bytes = fn.saved_bytes(p), work_bytes = fn.workspace_bytes(p);
  buffer<unsigned char> saved(gpu, saved_bytes), work(gpu, work_bytes);
  cce::forward_outputs out;
  out.loss = loss.get();
  cce::gradients<float> grads;  // fp32 gradients: they feed fp32 master weights
  grads.de = de.get();
  grads.dc = head_grad.get();

  std::printf(
      "model: %d context words, D=%lld, V=%lld, %.1fM parameters; batch %lld tokens, softcap %.0f, Adam lr %g\n",
      kContext, (long long)d, (long long)v, double(emb_size + head_size) / 1e6, (long long)n, kSoftcap, kLearningRate);
  std::printf("cce: saved %.1f KiB, workspace %.1f MiB (%s backward); the fp32 logits would take %.0f MiB\n",
              double(saved_bytes) / 1024, double(work_bytes) / (1 << 20), example::to_string(fn.mode(p, work_bytes)),
              double(n) * double(v) * 4 / (1 << 20));

  for (std::int64_t step = 1; step <= s.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    for_each(gpu, n, sample_batch{tokens.get(), count, std::uint64_t(step), context.get(), targets.get()});
    for_each(gpu, n * d, embed{emb.get(), context.get(), v, d, e.get()});
    check(fn.forward(p, out, saved.get(), saved_bytes, work.get(), work_bytes), "cce forward");
    check(fn.backward(p, grads, saved.get(), saved_bytes, work.get(), work_bytes), "cce backward");
    for_each(gpu, n * d, embed_backward{de.get(), context.get(), v, d, emb_grad.get()});
    const float step_loss = loss.download()[0];  // waits for the step's work so far
    auto t1 = std::chrono::steady_clock::now();

    // The check reads this step's E and C, so it runs before the update (and outside the timing).
    if (s.check > 0 && (step % s.check == 0 || step == 1)) {
      if (!check_loss(gpu, step, step_loss, e, head16, targets, n, v, d)) return 1;
    }
    const auto t2 = std::chrono::steady_clock::now();
    head_opt.step(head.get(), head_grad.get(), head16.get(), false);  // cce overwrites dC every step
    emb_opt.step(emb.get(), emb_grad.get(), nullptr, true);           // embed_backward adds into emb_grad
    if (gpu) example::check_cuda(cudaDeviceSynchronize(), "step");
    const auto t3 = std::chrono::steady_clock::now();

    const double seconds = std::chrono::duration<double>((t1 - t0) + (t3 - t2)).count();
    std::printf("step %5lld/%lld  loss %8.4f  %10.0f tokens/s  %s  cce workspace %zu bytes\n", (long long)step,
                (long long)s.steps, step_loss, double(n) / seconds, memory_in_use(gpu).c_str(), work_bytes);
    if (!std::isfinite(step_loss)) {
      std::fprintf(stderr, "the loss is not finite\n");
      return 1;
    }
  }
  return 0;
}

bool parse(const char* arg, std::int64_t& value) {
  char* end = nullptr;
  const long long x = std::strtoll(arg, &end, 10);
  if (end == arg || *end != '\0' || x < 0) return false;
  value = x;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  if (argc > 1) s.corpus = argv[1];
  if ((argc > 2 && !parse(argv[2], s.steps)) || (argc > 3 && (!parse(argv[3], s.batch) || s.batch == 0)) ||
      (argc > 4 && !parse(argv[4], s.check)) || argc > 5) {
    std::fprintf(stderr, "usage: %s [corpus = data/corpus.txt] [steps = 500] [batch tokens = 8192] [check = 100]\n",
                 argv[0]);
    return 2;
  }
  const bool gpu = example::gpu_available();
  if (!gpu) {
    s.steps = std::min<std::int64_t>(s.steps, 4);
    s.batch = std::min<std::int64_t>(s.batch, 64);
    s.check = 1;
    s.d = 32;
    std::printf(
        "no GPU visible: %lld steps of %lld tokens with D=%lld on the CPU (cce's tiled executor), checked every step\n",
        (long long)s.steps, (long long)s.batch, (long long)s.d);
  }

  corpus text;
  if (!load_corpus(s.corpus, kVocab, text)) {
    std::fprintf(stderr, "cannot read %s: scripts/fetch_corpus.sh writes data/corpus.txt, or pass a text file\n",
                 s.corpus.c_str());
    return 1;
  }
  if (std::int64_t(text.tokens.size()) <= kContext) {
    std::fprintf(stderr, "%s holds too few words\n", s.corpus.c_str());
    return 1;
  }
  std::printf(
      "corpus %s: %zu words, %lld distinct; vocabulary %zu entries (%zu most frequent words + <unk>), "
      "%.2f%% of the corpus is <unk>\n",
      s.corpus.c_str(), text.tokens.size(), (long long)text.distinct, text.words.size(), text.words.size() - 1,
      100.0 * double(text.unknown) / double(text.tokens.size()));
  return train(s, gpu, text);
}
