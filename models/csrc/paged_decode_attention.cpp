// Decode attention read straight from the paged KV pool: one query per sequence, keys and values fetched
// row by row through the block table, so the cache is read once instead of gathered into a copy first.
// Two ops, with the softmax (and GPT-OSS's sinks) left to torch in between:
//   paged_decode_scores(q [S,H,D], keys [slots,KVH,D], blocks [S,B], context_lens [S], block_size, window, scale)
//       -> scores [S,H,B*block_size]: q.k * scale for each sequence's visible keys, -inf elsewhere
//   paged_decode_values(probs [S,H,B*block_size], values [slots,KVH,D], blocks, context_lens, block_size, window)
//       -> out [S,H,D]: the probability-weighted sum of the visible value rows
// The visible keys of sequence s are positions [lo, ctx) with ctx = context_lens[s] and lo = ctx - window
// (or 0 when window is 0). Query head h reads KV head h / (H / KVH), as SDPA's enable_gqa does.
// q, probs and the results are float32; the pool is float32 or bfloat16 (--kv-cache-dtype), whose rows are
// widened to float32 as they are read: exact, so a bf16 pool gives what a float32 pool of the same values
// does, from half the bytes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#if defined(__x86_64__)
#define GPTSERVE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GPTSERVE_CLONES
#endif

struct Visible {
  int64_t lo, ctx;
};

Visible visible_keys(const int64_t* context_lens, int64_t s, int64_t window) {
  const int64_t ctx = context_lens[s];
  return {window > 0 ? std::max<int64_t>(0, ctx - window) : 0, ctx};
}

// A pool element as float32: bf16 is the high half of a float32's bits.
inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Eight lanes of partial sums (one AVX vector): vectorizes without reassociating any one of them. The dots
// of consecutive heads and keys are independent, so the out-of-order core overlaps their FMA chains.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * widen(b[i + j]);
  for (; i < n; ++i) part[i % 8] += a[i] * widen(b[i]);
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

void check_inputs(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& blocks,
                  const at::Tensor& context_lens) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "float32 queries / probabilities expected");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16,
              "a float32 or bfloat16 KV pool expected");
  TORCH_CHECK(x.is_contiguous() && cache.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.is_contiguous() && blocks.dim() == 2, "blocks: int64 [S,B]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous(), "context_lens: int64 [S]");
  TORCH_CHECK(cache.dim() == 3 && x.size(0) == blocks.size(0) && context_lens.numel() == blocks.size(0),
              "shapes do not agree");
}

// The kernels index the pool with these numbers unchecked, so they are checked here, once per call, in a
// plain loop (a few tensor reductions would cost more than the attention of a short context).
void check_bounds(const at::Tensor& cache, const at::Tensor& blocks, const at::Tensor& context_lens,
                  int64_t block_size) {
  TORCH_CHECK(block_size > 0 && cache.size(0) % block_size == 0, "the pool is not whole blocks");
  const int64_t num_blocks = cache.size(0) / block_size, width = blocks.size(1);
  const int64_t *b = blocks.data_ptr<int64_t>(), *c = context_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < blocks.numel(); ++i)
    TORCH_CHECK(b[i] >= 0 && b[i] < num_blocks, "a block id is outside the pool");
  for (int64_t s = 0; s < context_lens.numel(); ++s) {
    TORCH_CHECK(c[s] >= 1, "a sequence has no key to attend");
    TORCH_CHECK(c[s] <= width * block_size, "a context is longer than its blocks");
  }
}

struct Geometry {
  int64_t H, KVH, D, B, block_size, window;
  int64_t group() const { return H / KVH; }
  int64_t L() const { return B * block_size; }
  int64_t slot(const int64_t* blocks, int64_t s, int64_t t) const {
    return blocks[s * B + t / block_size] * block_size + t % block_size;
  }
};

// A task is one sequence and a run of its KV heads [kv_begin, kv_end): it walks the sequence's keys in
// order, reading that run of each cache row contiguously (all of the row when a task has every head, as
// soon as there are a few sequences per thread), which the hardware prefetcher follows.
// The bodies are inlined into one function per pool type (below), whose x86-64 clones are picked at load time
// by the CPU's features.
template <typename T>
inline __attribute__((always_inline)) void score_body(const float* q, const T* keys, const int64_t* blocks,
                                                      const int64_t* context_lens, float* scores, const Geometry& g,
                                                      int64_t s, int64_t kv_begin, int64_t kv_end, float scale) {
  const Visible vis = visible_keys(context_lens, s, g.window);
  const int64_t D = g.D, L = g.L();
  for (int64_t t = vis.lo; t < vis.ctx; ++t) {
    const T* row = keys + g.slot(blocks, s, t) * g.KVH * D;
    for (int64_t h = kv_begin * g.group(); h < kv_end * g.group(); ++h)
      scores[(s * g.H + h) * L + t] = dot(q + (s * g.H + h) * D, row + (h / g.group()) * D, D) * scale;
  }
}

template <typename T>
inline __attribute__((always_inline)) void value_body(const float* probs, const T* values, const int64_t* blocks,
                                                      const int64_t* context_lens, float* out, const Geometry& g,
                                                      int64_t s, int64_t kv_begin, int64_t kv_end, float* acc) {
  const Visible vis = visible_keys(context_lens, s, g.window);
  const int64_t D = g.D, L = g.L(), first = kv_begin * g.group(), last = kv_end * g.group();
  std::fill(acc, acc + (last - first) * D, 0.0f);
  for (int64_t t = vis.lo; t < vis.ctx; ++t) {
    const T* row = values + g.slot(blocks, s, t) * g.KVH * D;
    for (int64_t h = first; h < last; ++h) {
      const float p = probs[(s * g.H + h) * L + t];
      const T* v = row + (h / g.group()) * D;
      float* a = acc + (h - first) * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * widen(v[d]);
    }
  }
  std::copy(acc, acc + (last - first) * D, out + (s * g.H + first) * D);
}

// One overload of each task per pool type, each with its own x86-64 clones.
#define GPTSERVE_TASKS(T)                                                                                     \
  GPTSERVE_CLONES void score_task(const float* q, const T* keys, const int64_t* blocks,                       \
                                  const int64_t* context_lens, float* scores, const Geometry& g, int64_t s,  \
                                  int64_t kv_begin, int64_t kv_end, float scale) {                           \
    score_body(q, keys, blocks, context_lens, scores, g, s, kv_begin, kv_end, scale);                         \
  }                                                                                                           \
  GPTSERVE_CLONES void value_task(const float* probs, const T* values, const int64_t* blocks,                 \
                                  const int64_t* context_lens, float* out, const Geometry& g, int64_t s,     \
                                  int64_t kv_begin, int64_t kv_end, float* acc) {                            \
    value_body(probs, values, blocks, context_lens, out, g, s, kv_begin, kv_end, acc);                        \
  }
GPTSERVE_TASKS(float)
GPTSERVE_TASKS(at::BFloat16)
#undef GPTSERVE_TASKS

// Split each sequence's KV heads only as far as needed to give every thread work (one sequence decoding
// still uses every core); more sequences than that, and each task reads whole cache rows.
int64_t kv_splits(int64_t S, int64_t KVH) {
  return std::min<int64_t>(KVH, std::max<int64_t>(1, (at::get_num_threads() + S - 1) / S));
}

// fn(the pool's data as float* or at::BFloat16*): the ops' bodies are written once for both.
template <typename Fn>
void with_pool_data(const at::Tensor& pool, const Fn& fn) {
  if (pool.scalar_type() == at::kBFloat16)
    fn(pool.data_ptr<at::BFloat16>());
  else
    fn(pool.data_ptr<float>());
}

template <typename Task>
void for_each_task(int64_t S, int64_t KVH, const Task& task) {
  const int64_t splits = kv_splits(S, KVH);
  at::parallel_for(0, S * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / splits, part = i % splits;
      task(s, part * KVH / splits, (part + 1) * KVH / splits);
    }
  });
}

at::Tensor paged_decode_scores(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& blocks,
                               const at::Tensor& context_lens, int64_t block_size, int64_t window, double scale) {
  check_inputs(q, keys, blocks, context_lens);
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2), KVH = keys.size(1), B = blocks.size(1);
  TORCH_CHECK(keys.size(2) == D && H % KVH == 0, "head shapes do not agree");
  check_bounds(keys, blocks, context_lens, block_size);
  at::Tensor scores = at::full({S, H, B * block_size}, -std::numeric_limits<float>::infinity(), q.options());
  const Geometry g{H, KVH, D, B, block_size, window};
  const float* q_ptr = q.data_ptr<float>();
  const int64_t *b_ptr = blocks.data_ptr<int64_t>(), *c_ptr = context_lens.data_ptr<int64_t>();
  float* out = scores.data_ptr<float>();
  with_pool_data(keys, [&](const auto* k_ptr) {
    for_each_task(S, KVH, [&](int64_t s, int64_t kv_begin, int64_t kv_end) {
      score_task(q_ptr, k_ptr, b_ptr, c_ptr, out, g, s, kv_begin, kv_end, static_cast<float>(scale));
    });
  });
  return scores;
}

at::Tensor paged_decode_values(const at::Tensor& probs, const at::Tensor& values, const at::Tensor& blocks,
                               const at::Tensor& context_lens, int64_t block_size, int64_t window) {
  check_inputs(probs, values, blocks, context_lens);
  const int64_t S = probs.size(0), H = probs.size(1), KVH = values.size(1), D = values.size(2), B = blocks.size(1);
  TORCH_CHECK(probs.size(2) == B * block_size && H % KVH == 0, "probs do not match the blocks");
  check_bounds(values, blocks, context_lens, block_size);
  at::Tensor out = at::empty({S, H, D}, probs.options());
  const Geometry g{H, KVH, D, B, block_size, window};
  const float* p_ptr = probs.data_ptr<float>();
  const int64_t *b_ptr = blocks.data_ptr<int64_t>(), *c_ptr = context_lens.data_ptr<int64_t>();
  float* o_ptr = out.data_ptr<float>();
  with_pool_data(values, [&](const auto* v_ptr) {
    for_each_task(S, KVH, [&](int64_t s, int64_t kv_begin, int64_t kv_end) {
      std::vector<float> acc((kv_end - kv_begin) * g.group() * D);
      value_task(p_ptr, v_ptr, b_ptr, c_ptr, o_ptr, g, s, kv_begin, kv_end, acc.data());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(gptserve, m) {
  m.def("paged_decode_scores(Tensor q, Tensor keys, Tensor blocks, Tensor context_lens, int block_size, int window, float scale) -> Tensor");
  m.def("paged_decode_values(Tensor probs, Tensor values, Tensor blocks, Tensor context_lens, int block_size, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("paged_decode_scores", paged_decode_scores);
  m.impl("paged_decode_values", paged_decode_values);
}
