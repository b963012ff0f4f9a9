// Decode attention read straight from the paged KV pool: one query per sequence, keys and values fetched
// row by row through the block table, so the cache is read once instead of gathered into a copy first.
//   paged_decode_attention(q [S,H,D], keys [slots,KVH,D], values [slots,KVH,D], blocks [S,B], context_lens [S],
//                          block_size, window, scale, sinks [H] or None) -> out [S,H,D]
// Each task scores its heads' visible keys (q.k * scale), takes the softmax over them (with GPT-OSS's sink
// logit in the normalisation when given) and sums the value rows by those probabilities: one parallel region
// per call, no [S,H,context] scores tensor for torch to fill, soften and read back.
// The visible keys of sequence s are positions [lo, ctx) with ctx = context_lens[s] and lo = ctx - window
// (or 0 when window is 0). Query head h reads KV head h / (H / KVH), as SDPA's enable_gqa does.
// q and the result are float32; the pool is float32 or bfloat16 (--kv-cache-dtype), whose rows are widened
// to float32 as they are read: exact, so a bf16 pool gives what a float32 pool of the same values does, from
// half the bytes.
// ``isa`` (the op's last argument, "best" by default) picks the AVX-512 task (head dims a multiple of 16) or the
// portable one, which the compiler builds for AVX2 and for any x86-64 and which the CPU picks between at load
// time; tests ask for each path this CPU runs. The AVX-512 task sums each dot in sixteen lanes where the other
// sums eight, and takes the softmax sixteen scores at a time with its own exp (within 1.3 ulp of the exact one
// over [-104, 0]), so the two differ in the last bits of the probabilities; the value sums are taken in the
// same order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "paged_decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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
  int64_t slot(const int64_t* blocks, int64_t s, int64_t t) const {
    return blocks[s * B + t / block_size] * block_size + t % block_size;
  }
};

// Each head's scores [first, last) x span, in place, to the softmax over the visible keys, with the head's sink
// logit in the normalisation where there is one.
inline void softmax_rows(float* scores, int64_t span, int64_t first, int64_t last, const float* sinks) {
  for (int64_t h = first; h < last; ++h) {
    float* p = scores + (h - first) * span;
    float top = sinks ? sinks[h] : -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < span; ++i) top = std::max(top, p[i]);
    float total = sinks ? std::exp(sinks[h] - top) : 0.0f;
    for (int64_t i = 0; i < span; ++i) total += (p[i] = std::exp(p[i] - top));
    for (int64_t i = 0; i < span; ++i) p[i] /= total;
  }
}

// A task is one sequence and a run of its KV heads [kv_begin, kv_end): it walks the sequence's keys in
// order, reading that run of each cache row contiguously (all of the row when a task has every head, as
// soon as there are a few sequences per thread), which the hardware prefetcher follows; then the value rows
// the same way. scratch holds the task's scores, [heads of the task][visible keys], then its sums [heads][D].
// The body is inlined into one function per pool type (below), whose x86-64 clones are picked at load time
// by the CPU's features.
template <typename T>
inline __attribute__((always_inline)) void attend_body(const float* q, int64_t q_row_stride, const T* keys,
                                                       const T* values, const int64_t* blocks,
                                                       const int64_t* context_lens, const float* sinks, float* out,
                                                       const Geometry& g, int64_t s, int64_t kv_begin,
                                                       int64_t kv_end, float scale, float* scratch) {
  const Visible vis = visible_keys(context_lens, s, g.window);
  const int64_t D = g.D, span = vis.ctx - vis.lo, first = kv_begin * g.group(), last = kv_end * g.group();
  float* scores = scratch;
  float* acc = scratch + (last - first) * span;
  const float* q_seq = q + s * q_row_stride;
  for (int64_t t = vis.lo; t < vis.ctx; ++t) {
    const T* row = keys + g.slot(blocks, s, t) * g.KVH * D;
    for (int64_t h = first; h < last; ++h)
      scores[(h - first) * span + (t - vis.lo)] = dot(q_seq + h * D, row + (h / g.group()) * D, D) * scale;
  }
  softmax_rows(scores, span, first, last, sinks);
  std::fill(acc, acc + (last - first) * D, 0.0f);
  for (int64_t t = vis.lo; t < vis.ctx; ++t) {
    const T* row = values + g.slot(blocks, s, t) * g.KVH * D;
    for (int64_t h = first; h < last; ++h) {
      const float p = scores[(h - first) * span + (t - vis.lo)];
      const T* v = row + (h / g.group()) * D;
      float* a = acc + (h - first) * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * widen(v[d]);
    }
  }
  std::copy(acc, acc + (last - first) * D, out + (s * g.H + first) * D);
}

// One overload of the task per pool type, each with its own x86-64 clones.
#define GPTSERVE_TASK(T)                                                                                       \
  GPTSERVE_CLONES void attend_task(const float* q, int64_t q_row_stride, const T* keys, const T* values,       \
                                   const int64_t* blocks, const int64_t* context_lens, const float* sinks,     \
                                   float* out, const Geometry& g, int64_t s, int64_t kv_begin, int64_t kv_end, \
                                   float scale, float* scratch) {                                              \
    attend_body(q, q_row_stride, keys, values, blocks, context_lens, sinks, out, g, s, kv_begin, kv_end, scale, \
                scratch);                                                                                      \
  }
GPTSERVE_TASK(float)
GPTSERVE_TASK(at::BFloat16)
#undef GPTSERVE_TASK

// Heads whose value sums stay in registers together: four heads of 64 dims are 16 zmm accumulators.
constexpr int64_t kAvx512HeadsPerPass = 4, kAvx512MaxDim = 64;

#if defined(__x86_64__)
#define GPTSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

// Sixteen pool elements at p as float32 (bf16: the high half of a float32's bits).
GPTSERVE_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
GPTSERVE_AVX512 inline __m512 load16(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// exp(x) of sixteen floats x <= 0, as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), a
// degree-7 polynomial for e^r, and vscalefps for the 2^n, which goes to zero past float's range as exp does.
// Within 1.3 ulp of the exact exp over [-104, 0] (measured on 140M values); inputs are clamped at -104, below
// which exp is zero in float32 anyway.
GPTSERVE_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// The lanes of the sixteen scores from i that lie before span: all of them but in a row's tail.
inline __mmask16 lanes_before(int64_t span, int64_t i) {
  return i + 16 <= span ? 0xFFFF : static_cast<__mmask16>((1u << (span - i)) - 1);
}

// softmax_rows with sixteen scores a step: with the scalar exp a GPT-OSS decode call (64 heads x 520 keys)
// took 223 us, with this one 189 (bench/NOTES.md, session 15). A row's tail is masked: nothing past it is read
// or written.
GPTSERVE_AVX512 void softmax_rows_avx512(float* scores, int64_t span, int64_t first, int64_t last,
                                         const float* sinks) {
  for (int64_t h = first; h < last; ++h) {
    float* p = scores + (h - first) * span;
    __m512 top = _mm512_set1_ps(sinks ? sinks[h] : -std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < span; i += 16) {
      const __mmask16 m = lanes_before(span, i);
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, m, p + i));
    }
    const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < span; i += 16) {
      const __mmask16 m = lanes_before(span, i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + i), peak));
      _mm512_mask_storeu_ps(p + i, m, e);
      total = _mm512_mask_add_ps(total, m, total, e);
    }
    float sum = _mm512_reduce_add_ps(total);
    if (sinks) sum += std::exp(sinks[h] - _mm512_cvtss_f32(peak));
    const __m512 scale = _mm512_set1_ps(1.0f / sum);
    for (int64_t i = 0; i < span; i += 16) {
      const __mmask16 m = lanes_before(span, i);
      _mm512_mask_storeu_ps(p + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + i), scale));
    }
  }
}

// The portable task's work with sixteen-lane dots and the value sums held in registers, a few heads per pass
// over the value rows (each head's dims are their own cache lines, so a pass reads no line another reads).
// D is a multiple of 16 and at most kAvx512MaxDim.
template <typename T>
GPTSERVE_AVX512 void attend_task_avx512(const float* q, int64_t q_row_stride, const T* keys, const T* values,
                                        const int64_t* blocks, const int64_t* context_lens, const float* sinks,
                                        float* out, const Geometry& g, int64_t s, int64_t kv_begin, int64_t kv_end,
                                        float scale, float* scratch) {
  const Visible vis = visible_keys(context_lens, s, g.window);
  const int64_t D = g.D, lanes = D / 16, span = vis.ctx - vis.lo, first = kv_begin * g.group(),
                last = kv_end * g.group();
  float* scores = scratch;
  const float* q_seq = q + s * q_row_stride;
  for (int64_t t = vis.lo; t < vis.ctx; ++t) {
    const T* row = keys + g.slot(blocks, s, t) * g.KVH * D;
    for (int64_t kv = kv_begin; kv < kv_end; ++kv) {
      __m512 k[kAvx512MaxDim / 16];  // the key row widened once for the group's query heads
      for (int64_t l = 0; l < lanes; ++l) k[l] = load16(row + kv * D + 16 * l);
      for (int64_t h = kv * g.group(); h < (kv + 1) * g.group(); ++h) {
        const float* qh = q_seq + h * D;
        __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);
        for (int64_t l = 1; l < lanes; ++l) sum = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * l), k[l], sum);
        scores[(h - first) * span + (t - vis.lo)] = _mm512_reduce_add_ps(sum) * scale;
      }
    }
  }
  softmax_rows_avx512(scores, span, first, last, sinks);
  for (int64_t h0 = first; h0 < last; h0 += kAvx512HeadsPerPass) {
    const int64_t heads = std::min(kAvx512HeadsPerPass, last - h0);
    __m512 acc[kAvx512HeadsPerPass][kAvx512MaxDim / 16];
    for (int64_t j = 0; j < heads; ++j)
      for (int64_t l = 0; l < lanes; ++l) acc[j][l] = _mm512_setzero_ps();
    for (int64_t t = vis.lo; t < vis.ctx; ++t) {
      const T* row = values + g.slot(blocks, s, t) * g.KVH * D;
      __m512 v[kAvx512MaxDim / 16];  // the row of the heads' KV head, widened once for all that share it
      int64_t widened = -1;
      for (int64_t j = 0; j < heads; ++j) {
        const int64_t h = h0 + j;
        if (h / g.group() != widened) {
          widened = h / g.group();
          for (int64_t l = 0; l < lanes; ++l) v[l] = load16(row + widened * D + 16 * l);
        }
        const __m512 p = _mm512_set1_ps(scores[(h - first) * span + (t - vis.lo)]);
        for (int64_t l = 0; l < lanes; ++l) acc[j][l] = _mm512_fmadd_ps(p, v[l], acc[j][l]);
      }
    }
    for (int64_t j = 0; j < heads; ++j)
      for (int64_t l = 0; l < lanes; ++l) _mm512_storeu_ps(out + (s * g.H + h0 + j) * D + 16 * l, acc[j][l]);
  }
}
#undef GPTSERVE_AVX512
#endif

bool avx512_takes(Isa isa, int64_t D) { return isa == Isa::kAvx512 && D % 16 == 0 && D <= kAvx512MaxDim; }

// Split each sequence's KV heads only as far as needed to give every thread work (one sequence decoding
// still uses every core); more sequences than that, and each task reads whole cache rows.
int64_t kv_splits(int64_t S, int64_t KVH) {
  return std::min<int64_t>(KVH, std::max<int64_t>(1, (at::get_num_threads() + S - 1) / S));
}

// fn(keys, values) with the pool's data as float* or at::BFloat16*: the body is written once for both.
template <typename Fn>
void with_pool_data(const at::Tensor& keys, const at::Tensor& values, const Fn& fn) {
  if (keys.scalar_type() == at::kBFloat16)
    fn(keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>());
  else
    fn(keys.data_ptr<float>(), values.data_ptr<float>());
}

}  // namespace

namespace gptserve {

void paged_decode_attention_into(const float* q, int64_t q_row_stride, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& blocks, const at::Tensor& context_lens,
                                 int64_t num_heads, int64_t block_size, int64_t window, float scale,
                                 const float* sinks, float* out, Isa isa) {
  TORCH_CHECK(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16,
              "a float32 or bfloat16 KV pool expected");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.dim() == 3 && keys.sizes() == values.sizes() &&
                  keys.scalar_type() == values.scalar_type(),
              "keys and values: contiguous pools of one shape and dtype");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.is_contiguous() && blocks.dim() == 2, "blocks: int64 [S,B]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() &&
                  context_lens.numel() == blocks.size(0),
              "context_lens: int64 [S]");
  const int64_t S = blocks.size(0), KVH = keys.size(1), D = keys.size(2);
  TORCH_CHECK(num_heads % KVH == 0, "query heads are not a multiple of the KV heads");
  check_bounds(keys, blocks, context_lens, block_size);
  const Geometry g{num_heads, KVH, D, blocks.size(1), block_size, window};
  const int64_t *b_ptr = blocks.data_ptr<int64_t>(), *c_ptr = context_lens.data_ptr<int64_t>();
  const int64_t splits = kv_splits(S, KVH);
  const bool vector_path = avx512_takes(isa, D);
  with_pool_data(keys, values, [&](const auto* k_ptr, const auto* v_ptr) {
    at::parallel_for(0, S * splits, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = i / splits, part = i % splits;
        const int64_t kv_begin = part * KVH / splits, kv_end = (part + 1) * KVH / splits;
        const Visible vis = visible_keys(c_ptr, s, window);
        scratch.resize((kv_end - kv_begin) * g.group() * (vis.ctx - vis.lo + D));
#if defined(__x86_64__)
        if (vector_path) {
          attend_task_avx512(q, q_row_stride, k_ptr, v_ptr, b_ptr, c_ptr, sinks, out, g, s, kv_begin, kv_end, scale,
                             scratch.data());
          continue;
        }
#endif
        attend_task(q, q_row_stride, k_ptr, v_ptr, b_ptr, c_ptr, sinks, out, g, s, kv_begin, kv_end, scale,
                    scratch.data());
      }
    });
  });
}

}  // namespace gptserve

namespace {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                  const at::Tensor& blocks, const at::Tensor& context_lens, int64_t block_size,
                                  int64_t window, double scale, const c10::optional<at::Tensor>& sinks,
                                  const std::string& isa) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q: contiguous float32 [S,H,D]");
  TORCH_CHECK(q.size(0) == blocks.size(0) && q.size(2) == keys.size(2), "q does not match the blocks or the pool");
  const bool has_sinks = sinks.has_value() && sinks->defined();
  if (has_sinks)
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->numel() == q.size(1),
                "sinks: float32 [H]");
  at::Tensor out = at::empty(q.sizes(), q.options());
  gptserve::paged_decode_attention_into(q.data_ptr<float>(), q.size(1) * q.size(2), keys, values, blocks,
                                        context_lens, q.size(1), block_size, window, static_cast<float>(scale),
                                        has_sinks ? sinks->data_ptr<float>() : nullptr, out.data_ptr<float>(),
                                        choose_isa(isa));
  return out;
}

}  // namespace

TORCH_LIBRARY(gptserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor keys, Tensor values, Tensor blocks, Tensor context_lens, "
        "int block_size, int window, float scale, Tensor? sinks, str isa=\"best\") -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
}
