// A decode step's attention for the native step (app/models/native_step.py), float32, AVX-512 or
// AVX2 as q4_isa() answers: rotary embedding of q and k (and optional RMS norms of their heads),
// the new keys and values written into the KV cache's buffer, softmax attention over the cached
// columns; for one new token a row, or a prefill chunk of one sequence (causal). Where the CPU has
// avx512_bf16 and the caller asks, the dot products run on bf16 (attention_bf16.h). Plain C ABI.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "attention_bf16.h"
#include "attention_common.h"
#include "vexp.h"

namespace {

using adapterserve::exp256;
using adapterserve::exp512;
using adapterserve::Attend;
using adapterserve::exp_sum_avx2;
using adapterserve::exp_sum_avx512;
using adapterserve::rope_head;
using adapterserve::scores_avx512;
using adapterserve::attend_bf16;
using adapterserve::bf16_work;

// one row's key/value head g: the query heads of the group attend over T columns
template <int ISA>
__attribute__((always_inline)) inline void attend_group(const Attend& a, int64_t r, int64_t g, float* scores) {
  const int64_t D = a.D, T = a.col + 1 + (a.causal ? r : 0), rep = a.H / a.KV;
  const int64_t row = a.causal ? 0 : r * a.row_stride;
  const float* keys = static_cast<const float*>(a.kbuf) + row + g * a.head_stride;
  const float* values = static_cast<const float*>(a.vbuf) + row + g * a.head_stride;
  const uint8_t* mask = a.mask ? a.mask + r * a.mask_stride + (a.mask_stride - T) : nullptr;
  float q[8][512];
  for (int64_t j = 0; j < rep; ++j) {
    const int64_t h = g * rep + j;
    rope_head(a.qkv + r * a.qkv_stride + a.q_off + h * D, a.q_norm, a.norm_eps, a.cos + r * D, a.sin + r * D,
              D, q[j]);
    for (int64_t i = 0; i < D; ++i) q[j][i] *= a.scale;
  }
  for (int64_t j = 0; j < rep; ++j) {
    float* s = scores + j * T;
    float top = -INFINITY;
    int64_t t = 0;
    if constexpr (ISA == 2) t = scores_avx512(q[j], keys, D, T, s);  // whole blocks of 16 keys
    for (; t < T; ++t) {
      const float* k = keys + t * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < D; ++i) dot += q[j][i] * k[i];
      s[t] = dot;
    }
    for (t = 0; t < T; ++t) {
      if (mask && !mask[t]) s[t] = -INFINITY;
      top = s[t] > top ? s[t] : top;
    }
    float total = 0.f;
    t = ISA == 2 ? exp_sum_avx512(s, T, top, &total) : exp_sum_avx2(s, T, top, &total);
    for (; t < T; ++t) {
      s[t] = std::exp(s[t] - top);
      total += s[t];
    }
    float* o = a.out + r * a.H * D + (g * rep + j) * D;
    float acc[512] = {0.f};
    for (int64_t u = 0; u < T; ++u) {
      const float p = s[u];
      if (p == 0.f) continue;
      const float* v = values + u * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) acc[i] += p * v[i];
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < D; ++i) o[i] = acc[i] * inv;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void attend_avx512(
    const Attend& a, int64_t r, int64_t g, float* scores) {
  attend_group<2>(a, r, g, scores);
}

__attribute__((target("avx2,fma,f16c"))) void attend_avx2(const Attend& a, int64_t r, int64_t g, float* scores) {
  attend_group<1>(a, r, g, scores);
}

// acc0 (and acc1, when not null) [16 C] += sum over u of p0[u] (p1[u]) * values[u] [16 C]
template <int C>
__attribute__((target("avx512f,fma"), always_inline)) inline void pv_pair(float* acc0, float* acc1, const float* p0,
                                                                        const float* p1, const float* values,
                                                                        int64_t u0, int64_t u1) {
  __m512 x[C], y[C];
  for (int c = 0; c < C; ++c) {
    x[c] = _mm512_loadu_ps(acc0 + 16 * c);
    y[c] = acc1 ? _mm512_loadu_ps(acc1 + 16 * c) : _mm512_setzero_ps();
  }
  for (int64_t u = u0; u < u1; ++u) {
    const __m512 a = _mm512_set1_ps(p0[u]), b = _mm512_set1_ps(acc1 ? p1[u] : 0.f);
    const float* vu = values + u * 16 * C;
    for (int c = 0; c < C; ++c) {
      const __m512 w = _mm512_loadu_ps(vu + 16 * c);
      x[c] = _mm512_fmadd_ps(a, w, x[c]);
      y[c] = _mm512_fmadd_ps(b, w, y[c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm512_storeu_ps(acc0 + 16 * c, x[c]);
    if (acc1) _mm512_storeu_ps(acc1 + 16 * c, y[c]);
  }
}

// the largest of s[0 .. n)
__attribute__((target("avx512f"))) float max_avx512(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
  float top = _mm512_reduce_max_ps(m);
  for (; t < n; ++t) top = s[t] > top ? s[t] : top;
  return top;
}

// A causal prefill chunk's attention for key/value head g and the new tokens r0 .. r0 + nb - 1 (of
// one sequence): the queries of the block (nb tokens x the group's heads) against each block of
// 16 keys while it is in L1, then each block of 16 values into every query's sums. work: the
// queries, their sums (nq x D each) and scores (nq x T).
constexpr int QBLOCK = 8;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void attend_block_avx512(
    const Attend& a, int64_t g, int64_t r0, int64_t nb, float* work) {
  const int64_t D = a.D, rep = a.H / a.KV, nq = nb * rep;
  const int64_t T = a.col + r0 + nb;  // the last token's columns
  const float* keys = static_cast<const float*>(a.kbuf) + g * a.head_stride;
  const float* values = static_cast<const float*>(a.vbuf) + g * a.head_stride;
  float* q = work;
  float* acc = q + nq * D;
  float* s = acc + nq * D;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < rep; ++j) {
      const int64_t r = r0 + b, h = g * rep + j;
      float* qv = q + (b * rep + j) * D;
      rope_head(a.qkv + r * a.qkv_stride + a.q_off + h * D, a.q_norm, a.norm_eps, a.cos + r * D, a.sin + r * D, D,
                qv);
      for (int64_t i = 0; i < D; ++i) qv[i] *= a.scale;
    }
  int64_t t0 = 0;
  for (; t0 + 16 <= T; t0 += 16)
    for (int64_t v = 0; v < nq; ++v) scores_avx512(q + v * D, keys + t0 * D, D, 16, s + v * T + t0);
  for (int64_t v = 0; v < nq; ++v)
    for (int64_t t = t0; t < T; ++t) {
      float dot = 0.f;
      for (int64_t i = 0; i < D; ++i) dot += q[v * D + i] * keys[t * D + i];
      s[v * T + t] = dot;
    }
  float totals[QBLOCK * 8];
  for (int64_t v = 0; v < nq; ++v) {
    float* sv = s + v * T;
    const int64_t limit = a.col + 1 + r0 + v / rep;  // causal: this token's columns
    const float top = max_avx512(sv, limit);
    float total = 0.f;
    int64_t t = exp_sum_avx512(sv, limit, top, &total);
    for (; t < limit; ++t) {
      sv[t] = std::exp(sv[t] - top);
      total += sv[t];
    }
    for (t = limit; t < T; ++t) sv[t] = 0.f;
    totals[v] = total;
  }
  for (int64_t i = 0; i < nq * D; ++i) acc[i] = 0.f;
  // sums over the values: two queries' whole head in registers (2 D / 16 independent chains keep
  // the FMA units busy), each value vector read once for both
  for (int64_t u0 = 0; u0 < T; u0 += 64) {
    const int64_t u1 = u0 + 64 < T ? u0 + 64 : T;
    for (int64_t v = 0; v < nq; v += 2) {
      const bool two = v + 1 < nq;
      float* a0 = acc + v * D;
      float* a1 = two ? a0 + D : nullptr;
      const float* p0 = s + v * T;
      switch (D) {
        case 64:
          pv_pair<4>(a0, a1, p0, p0 + T, values, u0, u1);
          break;
        case 128:
          pv_pair<8>(a0, a1, p0, p0 + T, values, u0, u1);
          break;
        case 32:
          pv_pair<2>(a0, a1, p0, p0 + T, values, u0, u1);
          break;
        default:
          for (int64_t c = 0; c < D; c += 16)
            for (int64_t w = v; w < (two ? v + 2 : v + 1); ++w) {
              __m512 sum = _mm512_loadu_ps(acc + w * D + c);
              for (int64_t u = u0; u < u1; ++u)
                sum = _mm512_fmadd_ps(_mm512_set1_ps(s[w * T + u]), _mm512_loadu_ps(values + u * D + c), sum);
              _mm512_storeu_ps(acc + w * D + c, sum);
            }
      }
    }
  }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < rep; ++j) {
      const int64_t v = b * rep + j;
      float* o = a.out + (r0 + b) * a.H * D + (g * rep + j) * D;
      const float inv = 1.f / totals[v];
      for (int64_t i = 0; i < D; ++i) o[i] = acc[v * D + i] * inv;
    }
}

// the rotated, scaled queries of token r's heads of group g into q [rep, D]
void group_queries(const Attend& a, int64_t r, int64_t g, float* q) {
  const int64_t D = a.D, rep = a.H / a.KV;
  for (int64_t j = 0; j < rep; ++j) {
    const int64_t h = g * rep + j;
    rope_head(a.qkv + r * a.qkv_stride + a.q_off + h * D, a.q_norm, a.norm_eps, a.cos + r * D, a.sin + r * D, D,
              q + j * D);
    for (int64_t i = 0; i < D; ++i) q[j * D + i] *= a.scale;
  }
}

// bf16 dot products: one row's group g (a decode step), or the tokens r0 .. r0 + nb - 1 of a causal
// chunk; work: bf16_work(nq, T, D) + nq * (D + 1) floats
void attend_bf16_task(const Attend& a, int64_t r0, int64_t nb, int64_t g, float* work) {
  const int64_t D = a.D, rep = a.H / a.KV, nq = nb * rep;
  const int64_t T = a.causal ? a.col + r0 + nb : a.col + 1;
  const int64_t row = a.causal ? 0 : r0 * a.row_stride;
  float* q = work;
  int64_t* limit = reinterpret_cast<int64_t*>(q + nq * D);  // (nq int64: 2 nq floats)
  for (int64_t b = 0; b < nb; ++b) {
    group_queries(a, r0 + b, g, q + b * rep * D);
    for (int64_t j = 0; j < rep; ++j) limit[b * rep + j] = a.causal ? a.col + 1 + r0 + b : T;
  }
  const uint8_t* mask = a.mask ? a.mask + r0 * a.mask_stride + (a.mask_stride - T) : nullptr;
  float* out = a.out + r0 * a.H * D + g * rep * D;
  const int64_t at = row + g * a.head_stride;
  float* rest = work + nq * D + 2 * nq;
  if (a.kv_bf16)
    attend_bf16(q, nq, static_cast<const uint16_t*>(a.kbuf) + at, static_cast<const uint16_t*>(a.vbuf) + at, T, D,
                limit, mask, out, rep, a.H * D, rest);
  else
    attend_bf16(q, nq, static_cast<const float*>(a.kbuf) + at, static_cast<const float*>(a.vbuf) + at, T, D, limit,
                mask, out, rep, a.H * D, rest);
}

}  // namespace

extern "C" {

int attend_bf16_supported();

// One decode step's attention for M rows of one new token each (see the file's head): q, k, v
// read from qkv [M, qkv_stride] at q_off / k_off / v_off (H, KV, KV heads of D); the new key
// (normalized, rotated) and value written at column col of the buffers (kbuf / vbuf: row r, head
// g, column t at r * row_stride + g * head_stride + t * D); out [M, H * D]. D <= 512, H / KV <= 8.
// causal: the M rows are M new tokens of the cache's row 0 instead (a prefill chunk of one
// sequence): token r written at column col + r, attending to the columns up to it; no mask.
// bf16: q.k and p.v as bf16 dot products where attend_bf16_supported() (D a multiple of 32, at most 256);
// kv_bf16: the buffers hold bf16 (uint16_t) keys and values, which only that path reads.
// Returns 0, or -1 (nothing done) for bf16 buffers where the bf16 path does not run.
int step_attend(int isa, int64_t M, int64_t H, int64_t KV, int64_t D, const float* qkv, int64_t qkv_stride,
                int64_t q_off, int64_t k_off, int64_t v_off, const float* cos, const float* sin, const float* q_norm,
                const float* k_norm, float norm_eps, void* kbuf, void* vbuf, int64_t row_stride,
                int64_t head_stride, int64_t col, const uint8_t* mask, int64_t mask_stride, float scale, float* out,
                int causal, int bf16, int kv_bf16) {
  static const bool has_bf16 = attend_bf16_supported() != 0;
  const bool dots = bf16 && has_bf16 && isa == 2 && D % 32 == 0 && D <= 256;
  if (kv_bf16 && !dots) return -1;
  const Attend a{H,      KV,     D,      qkv,      qkv_stride, q_off,       k_off, v_off,
                 cos,    sin,    q_norm, k_norm,   norm_eps,   kbuf,        vbuf,  row_stride,
                 head_stride, col, kv_bf16, causal ? nullptr : mask, mask_stride, scale, out, causal};
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < KV; ++g) {
      const float* src = qkv + r * qkv_stride;
      const int64_t at = causal ? g * head_stride + (col + r) * D : r * row_stride + g * head_stride + col * D;
      if (kv_bf16) {
        float key[512];
        rope_head(src + k_off + g * D, k_norm, norm_eps, cos + r * D, sin + r * D, D, key);
        adapterserve::store_bf16(key, D, static_cast<uint16_t*>(kbuf) + at);
        adapterserve::store_bf16(src + v_off + g * D, D, static_cast<uint16_t*>(vbuf) + at);
        continue;
      }
      rope_head(src + k_off + g * D, k_norm, norm_eps, cos + r * D, sin + r * D, D, static_cast<float*>(kbuf) + at);
      memcpy(static_cast<float*>(vbuf) + at, src + v_off + g * D, D * sizeof(float));
    }
  }
  const int64_t T = col + 1 + (causal ? M - 1 : 0), tasks = M * KV, rep = H / KV;
  const bool split = tasks >= 2 && tasks * rep * T * D >= (1 << 15);
  if (dots) {  // one token a task, or a causal chunk's blocks
    int64_t nb = causal ? (M < QBLOCK ? M : QBLOCK) : 1;
    // a short chunk (6-8 tokens) in two blocks when its tasks are fewer than twice the threads (a query's
    // sums do not depend on its block: the same bits, the keys transposed once more a block)
    while (causal && split && nb >= 6 && (M + nb - 1) / nb * KV < 2 * omp_get_max_threads()) nb = (nb + 1) / 2;
    const int64_t blocks = causal ? (M + nb - 1) / nb : M, count = blocks * KV;
#pragma omp parallel if (split)
    {
      thread_local std::vector<float> work;
      work.resize(bf16_work(nb * rep, T, D) + nb * rep * (D + 2));
#pragma omp for schedule(dynamic)
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r0 = (i / KV) * nb;
        attend_bf16_task(a, r0, M - r0 < nb ? M - r0 : nb, i % KV, work.data());
      }
    }
    return 0;
  }
  if (causal && isa == 2 && M > 1) {  // blocks of new tokens: each key and value read once a block
    const int64_t blocks = (M + QBLOCK - 1) / QBLOCK, count = blocks * KV;
#pragma omp parallel if (split)
    {
      thread_local std::vector<float> work;
      work.resize(QBLOCK * rep * (T + 2 * D));
#pragma omp for schedule(dynamic)
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r0 = (i / KV) * QBLOCK;
        attend_block_avx512(a, i % KV, r0, M - r0 < QBLOCK ? M - r0 : QBLOCK, work.data());
      }
    }
    return 0;
  }
#pragma omp parallel if (split)
  {
    thread_local std::vector<float> scores;
    scores.resize(rep * T);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tasks; ++i) {
      if (isa == 2)
        attend_avx512(a, i / KV, i % KV, scores.data());
      else
        attend_avx2(a, i / KV, i % KV, scores.data());
    }
  }
  return 0;
}

// Whether step_attend's bf16 dot products run on this CPU (AVX-512 with avx512_bf16).
int attend_bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") ? 1 : 0;
}

}  // extern "C"
