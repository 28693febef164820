// The rest of a decoder layer's decode step around the int4 matmuls (q4.cpp), for one new token
// per row: SwiGLU, and attention (rotary embedding of q and k, optional RMS norms of their heads,
// the new key and value written into the KV cache's buffer, softmax over the cached columns).
// Float32 throughout, AVX-512 or AVX2 as q4_isa() answers. Plain C ABI (ctypes).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

namespace {

// e^x for x <= 0 (softmax, sigmoid): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p of degree 6
// (relative error ~2e-7); x below -87 gives 0
__attribute__((target("avx512f"), always_inline)) inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
}

__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// silu(g) * u = g / (1 + e^-g) * u; e^-|g| keeps the exponent non-positive
__attribute__((target("avx512f"))) void swiglu_avx512(const float* g, const float* u, int64_t K, float* y) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= K; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __m512 pos = _mm512_div_ps(one, _mm512_add_ps(one, e));       // sigmoid(|x|)
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 s = _mm512_mask_sub_ps(pos, neg, one, pos);             // sigmoid(x)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(x, s), _mm512_loadu_ps(u + i)));
  }
  for (; i < K; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

__attribute__((target("avx2,fma"))) void swiglu_avx2(const float* g, const float* u, int64_t K, float* y) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= K; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp256(_mm256_or_ps(x, sign));  // e^-|x|
    const __m256 pos = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 s = _mm256_blendv_ps(pos, _mm256_sub_ps(one, pos), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_loadu_ps(u + i)));
  }
  for (; i < K; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

struct Attend {
  int64_t H, KV, D;
  const float* qkv;
  int64_t qkv_stride, q_off, k_off, v_off;
  const float* cos;  // [M, D]
  const float* sin;
  const float* q_norm;  // [D] or null
  const float* k_norm;
  float norm_eps;
  float* kbuf;
  float* vbuf;
  int64_t row_stride, head_stride, col;
  const uint8_t* mask;  // [M, mask_stride], the last T = col + 1 columns read, or null
  int64_t mask_stride;
  float scale;
  float* out;  // [M, H * D]
  int causal;  // rows are consecutive new tokens of one cache row: row r at column col + r
};

// the head x [D] normalized (if w) and rotated: x * cos + rotate_half(x) * sin
void rope_head(const float* x, const float* w, float eps, const float* cos, const float* sin, int64_t D,
               float* y) {
  float tmp[512];
  const float* v = x;
  if (w != nullptr) {
    float sum = 0.f;
    for (int64_t i = 0; i < D; ++i) sum += x[i] * x[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) tmp[i] = w[i] * (x[i] * inv);
    v = tmp;
  }
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) y[i] = v[i] * cos[i] - v[i + h] * sin[i];
  for (int64_t i = h; i < D; ++i) y[i] = v[i] * cos[i] + v[i - h] * sin[i];
}

// s[t] = e^(s[t] - top) over the whole vectors of s; their sum into *total; the first t not done
__attribute__((target("avx512f,avx512dq"))) int64_t exp_sum_avx512(float* s, int64_t T, float top, float* total) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(top);
  int64_t t = 0;
  for (; t + 16 <= T; t += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
    _mm512_storeu_ps(s + t, e);
    acc = _mm512_add_ps(acc, e);
  }
  *total = _mm512_reduce_add_ps(acc);
  return t;
}

__attribute__((target("avx2,fma"))) int64_t exp_sum_avx2(float* s, int64_t T, float top, float* total) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 m = _mm256_set1_ps(top);
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  *total = sum;
  return t;
}

// s[t] = q . keys[t] for the whole blocks of 16 keys (D a multiple of 16): each key's products
// in a register, the 16 registers' sums reduced together (a transposing tree); the first t not done
__attribute__((target("avx512f,avx512dq"))) int64_t scores_avx512(const float* q, const float* keys, int64_t D,
                                                                int64_t T, float* s) {
  int64_t t = 0;
  for (; t + 16 <= T; t += 16) {
    __m512 v[16];
    for (int i = 0; i < 16; ++i) v[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 qd = _mm512_loadu_ps(q + d);
      for (int i = 0; i < 16; ++i) v[i] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys + (t + i) * D + d), v[i]);
    }
    __m512 u[8], w[4];
    for (int k = 0; k < 8; ++k)
      u[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; ++k) {
      const __m512d x = _mm512_castps_pd(u[2 * k]), y = _mm512_castps_pd(u[2 * k + 1]);
      w[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
    const __m512 sum = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
    _mm512_storeu_ps(s + t, sum);  // (lane i: key t + i)
  }
  return t;
}

// one row's key/value head g: the query heads of the group attend over T columns
template <int ISA>
__attribute__((always_inline)) inline void attend_group(const Attend& a, int64_t r, int64_t g, float* scores) {
  const int64_t D = a.D, T = a.col + 1 + (a.causal ? r : 0), rep = a.H / a.KV;
  const int64_t row = a.causal ? 0 : r * a.row_stride;
  const float* keys = a.kbuf + row + g * a.head_stride;
  const float* values = a.vbuf + row + g * a.head_stride;
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

// Rows of one adapter (n <= RUN, x rows K apart, y rows ldy apart): y[i, :out] += scale *
// (x[i] . A^T[K, rank]) . B^T[rank, out]. The weights are read once for the n rows: t = x . A^T
// with each row's vector of 16 ranks in a register over K, then each vector of 16 outputs of y
// with the n rows' sums over the rank in registers.
constexpr int RUN = 8;
constexpr int W5 = 5;  // int64s per entry of lora_rows' table

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 load16(const float* p,
                                                                                      __mmask16 live) {
  return _mm512_maskz_loadu_ps(live, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 load16(const int8_t* p,
                                                                                      __mmask16 live) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, p)));
}
__attribute__((target("avx2,fma"), always_inline)) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"), always_inline)) inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// (int8 weights: A^T's column j and B^T's row j scaled by sa[j] and sb[j]; float: both null).
// A few rows leave the FMA units idle on one chain per row: U chains over K and V vectors of y
// at a time then.
template <int n, typename W>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void lora_run_avx512(
    const float* x, int64_t K, const W* a, const W* b, const float* sa, const float* sb, int64_t rank,
    float scale, int64_t out, float* y, int64_t ldy, float* t) {
  constexpr int U = n == 1 ? 4 : n == 2 ? 2 : 1;
  for (int64_t j0 = 0; j0 < rank; j0 += 16) {
    const __mmask16 live = rank - j0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (rank - j0)) - 1);
    __m512 acc[n][U];
    for (int i = 0; i < n; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + U <= K; k += U) {
      _mm_prefetch(reinterpret_cast<const char*>(a + (k + U) * rank + j0) + 2048, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m512 ak = load16(a + (k + u) * rank + j0, live);
        for (int i = 0; i < n; ++i) acc[i][u] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k + u]), ak, acc[i][u]);
      }
    }
    for (; k < K; ++k) {
      const __m512 ak = load16(a + k * rank + j0, live);
      for (int i = 0; i < n; ++i) acc[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k]), ak, acc[i][0]);
    }
    __m512 f = _mm512_set1_ps(scale);
    if (sa != nullptr)
      f = _mm512_mul_ps(f, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, sa + j0), _mm512_maskz_loadu_ps(live, sb + j0)));
    for (int i = 0; i < n; ++i) {
      __m512 sum = acc[i][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[i][u]);
      _mm512_mask_storeu_ps(t + i * rank + j0, live, _mm512_mul_ps(sum, f));
    }
  }
  const int64_t whole = out / 16 * 16;
  if constexpr (n >= 4) {  // several rows: each vector of y's rows in registers over the rank
    for (int64_t o = 0; o < whole; o += 16) {
      __m512 acc[n];
      for (int i = 0; i < n; ++i) acc[i] = _mm512_loadu_ps(y + i * ldy + o);
      for (int64_t j = 0; j < rank; ++j) {
        const __m512 w = load16(b + j * out + o, 0xFFFF);
        for (int i = 0; i < n; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[i * rank + j]), w, acc[i]);
      }
      for (int i = 0; i < n; ++i) _mm512_storeu_ps(y + i * ldy + o, acc[i]);
    }
    for (int64_t j = 0; j < rank; ++j)
      for (int64_t o = whole; o < out; ++o)
        for (int i = 0; i < n; ++i) y[i * ldy + o] += t[i * rank + j] * static_cast<float>(b[j * out + o]);
    return;
  }
  // B^T row by row (one stream through memory), y's rows (in L1) accumulating
  for (int64_t j = 0; j < rank; ++j) {
    const W* bj = b + j * out;
    __m512 tj[n];
    for (int i = 0; i < n; ++i) tj[i] = _mm512_set1_ps(t[i * rank + j]);
    for (int64_t o = 0; o < whole; o += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(bj + o) + 2048, _MM_HINT_T0);
      const __m512 w = load16(bj + o, 0xFFFF);
      for (int i = 0; i < n; ++i) {
        float* yo = y + i * ldy + o;
        _mm512_storeu_ps(yo, _mm512_fmadd_ps(tj[i], w, _mm512_loadu_ps(yo)));
      }
    }
    for (int64_t o = whole; o < out; ++o)
      for (int i = 0; i < n; ++i) y[i * ldy + o] += t[i * rank + j] * static_cast<float>(bj[o]);
  }
}

template <int n, typename W>
__attribute__((target("avx2,fma"))) void lora_run_avx2(const float* x, int64_t K, const W* a, const W* b,
                                                      const float* sa, const float* sb, int64_t rank, float scale,
                                                      int64_t out, float* y, int64_t ldy, float* t) {
  int64_t j0 = 0;
  for (; j0 + 8 <= rank; j0 += 8) {
    __m256 acc[RUN];
    for (int i = 0; i < n; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 ak = load8(a + k * rank + j0);
      for (int i = 0; i < n; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(x[i * K + k]), ak, acc[i]);
    }
    __m256 f = _mm256_set1_ps(scale);
    if (sa != nullptr) f = _mm256_mul_ps(f, _mm256_mul_ps(_mm256_loadu_ps(sa + j0), _mm256_loadu_ps(sb + j0)));
    for (int i = 0; i < n; ++i) _mm256_storeu_ps(t + i * rank + j0, _mm256_mul_ps(acc[i], f));
  }
  for (; j0 < rank; ++j0)
    for (int i = 0; i < n; ++i) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += x[i * K + k] * static_cast<float>(a[k * rank + j0]);
      t[i * rank + j0] = sum * scale * (sa != nullptr ? sa[j0] * sb[j0] : 1.f);
    }
  int64_t o = 0;
  for (; o + 8 <= out; o += 8) {
    __m256 acc[RUN];
    for (int i = 0; i < n; ++i) acc[i] = _mm256_loadu_ps(y + i * ldy + o);
    for (int64_t j = 0; j < rank; ++j) {
      const __m256 bj = load8(b + j * out + o);
      for (int i = 0; i < n; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(t[i * rank + j]), bj, acc[i]);
    }
    for (int i = 0; i < n; ++i) _mm256_storeu_ps(y + i * ldy + o, acc[i]);
  }
  for (; o < out; ++o)
    for (int i = 0; i < n; ++i)
      for (int64_t j = 0; j < rank; ++j) y[i * ldy + o] += t[i * rank + j] * b[j * out + o];
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
  const float* keys = a.kbuf + g * a.head_stride;
  const float* values = a.vbuf + g * a.head_stride;
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

}  // namespace

extern "C" {

// Each row's LoRA deltas for the P parts of a group (q, k, v; gate, up): for row r and part p,
// y[r, offsets[p] :+ outs[p]] += scales[r, p] * (x[r] . A^T) . B^T, with A^T [K, rank] and B^T
// [rank, outs[p]] at the addresses table[r, p] = (A^T, B^T, rank, sa, sb; rank 0: no delta):
// float32, or int8 with A^T's columns and B^T's rows scaled by sa [rank] and sb [rank] (float32).
// The adapters' own weights are read in place (no copy per batch), once per run of consecutive
// rows of one adapter.
void lora_rows(int isa, int64_t M, int64_t P, const float* x, int64_t K, float* y, int64_t ldy,
               const int64_t* table, const float* scales, const int64_t* offsets, const int64_t* outs) {
  // tasks: (part, first row, rows) over runs of up to RUN consecutive rows whose parts' weights
  // are the same (rows of one adapter), run by run (a row's parts one after the other)
  thread_local std::vector<int64_t> tasks;
  tasks.clear();
  int64_t work = 0;
  const auto same = [&](int64_t r, int64_t s) {
    for (int64_t p = 0; p < P; ++p) {
      const int64_t* e = table + W5 * (r * P + p);
      const int64_t* f = table + W5 * (s * P + p);
      for (int c = 0; c < W5; ++c)
        if (e[c] != f[c]) return false;
      if (scales[r * P + p] != scales[s * P + p]) return false;
    }
    return true;
  };
  for (int64_t r = 0; r < M;) {
    int64_t n = 1;
    while (r + n < M && n < RUN && same(r, r + n)) ++n;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t rank = table[W5 * (r * P + p) + 2];
      if (rank != 0) {
        tasks.insert(tasks.end(), {p, r, n});
        work += rank * (K + outs[p]);
      }
    }
    r += n;
  }
  const int64_t count = static_cast<int64_t>(tasks.size()) / 3;
  const int64_t* plan = tasks.data();
  const bool split = count >= 2 && work >= (1 << 16);
#pragma omp parallel if (split)
  {
    thread_local std::vector<float> t;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < count; ++i) {
      const int64_t p = plan[3 * i], r = plan[3 * i + 1];
      const int n = static_cast<int>(plan[3 * i + 2]);
      const int64_t* e = table + W5 * (r * P + p);
      const int64_t rank = e[2];
      if (static_cast<int64_t>(t.size()) < RUN * rank) t.resize(RUN * rank);
      const float* sa = reinterpret_cast<const float*>(e[3]);
      const float* sb = reinterpret_cast<const float*>(e[4]);
      const float scale = scales[r * P + p];
      float* yr = y + r * ldy + offsets[p];
      const float* xr = x + r * K;
      float* buf = t.data();
      switch (isa == 2 ? n : RUN + n) {
#define LORA_RUN(N)                                                                                  \
  case N:                                                                                            \
    if (sa != nullptr)                                                                               \
      lora_run_avx512<N>(xr, K, reinterpret_cast<const int8_t*>(e[0]), reinterpret_cast<const int8_t*>(e[1]), \
                         sa, sb, rank, scale, outs[p], yr, ldy, buf);                                \
    else                                                                                             \
      lora_run_avx512<N>(xr, K, reinterpret_cast<const float*>(e[0]), reinterpret_cast<const float*>(e[1]),  \
                         sa, sb, rank, scale, outs[p], yr, ldy, buf);                                \
    break;                                                                                           \
  case RUN + N:                                                                                      \
    if (sa != nullptr)                                                                               \
      lora_run_avx2<N>(xr, K, reinterpret_cast<const int8_t*>(e[0]), reinterpret_cast<const int8_t*>(e[1]),   \
                       sa, sb, rank, scale, outs[p], yr, ldy, buf);                                  \
    else                                                                                             \
      lora_run_avx2<N>(xr, K, reinterpret_cast<const float*>(e[0]), reinterpret_cast<const float*>(e[1]),    \
                       sa, sb, rank, scale, outs[p], yr, ldy, buf);                                  \
    break;
        LORA_RUN(1) LORA_RUN(2) LORA_RUN(3) LORA_RUN(4) LORA_RUN(5) LORA_RUN(6) LORA_RUN(7) LORA_RUN(8)
#undef LORA_RUN
      }
    }
  }
}

void swiglu_rows(int isa, const float* x, int64_t M, int64_t K, float* y) {
  for (int64_t r = 0; r < M; ++r) {
    if (isa == 2)
      swiglu_avx512(x + r * 2 * K, x + r * 2 * K + K, K, y + r * K);
    else
      swiglu_avx2(x + r * 2 * K, x + r * 2 * K + K, K, y + r * K);
  }
}

// One decode step's attention for M rows of one new token each (see the file's head): q, k, v
// read from qkv [M, qkv_stride] at q_off / k_off / v_off (H, KV, KV heads of D); the new key
// (normalized, rotated) and value written at column col of the buffers (kbuf / vbuf: row r, head
// g, column t at r * row_stride + g * head_stride + t * D); out [M, H * D]. D <= 512, H / KV <= 8.
// causal: the M rows are M new tokens of the cache's row 0 instead (a prefill chunk of one
// sequence): token r written at column col + r, attending to the columns up to it; no mask.
void step_attend(int isa, int64_t M, int64_t H, int64_t KV, int64_t D, const float* qkv, int64_t qkv_stride,
                 int64_t q_off, int64_t k_off, int64_t v_off, const float* cos, const float* sin,
                 const float* q_norm, const float* k_norm, float norm_eps, float* kbuf, float* vbuf,
                 int64_t row_stride, int64_t head_stride, int64_t col, const uint8_t* mask,
                 int64_t mask_stride, float scale, float* out, int causal) {
  const Attend a{H,      KV,     D,      qkv,      qkv_stride, q_off,       k_off, v_off,
                 cos,    sin,    q_norm, k_norm,   norm_eps,   kbuf,        vbuf,  row_stride,
                 head_stride, col, causal ? nullptr : mask, mask_stride, scale, out, causal};
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < KV; ++g) {
      const float* src = qkv + r * qkv_stride;
      const int64_t at = causal ? g * head_stride + (col + r) * D : r * row_stride + g * head_stride + col * D;
      rope_head(src + k_off + g * D, k_norm, norm_eps, cos + r * D, sin + r * D, D, kbuf + at);
      memcpy(vbuf + at, src + v_off + g * D, D * sizeof(float));
    }
  }
  const int64_t T = col + 1 + (causal ? M - 1 : 0), tasks = M * KV, rep = H / KV;
  const bool split = tasks >= 2 && tasks * rep * T * D >= (1 << 15);
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
    return;
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
}

}  // extern "C"
