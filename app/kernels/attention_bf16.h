// Attention on bf16 dot products (AVX-512 with avx512_bf16), for the native step's attention.cpp:
// the queries of one key/value head against its keys and values, read as float32 from the cache and
// rounded to bf16 (round to nearest even) block by block; q.k and p.v summed in float32 by
// vdpbf16ps (32 products an instruction, twice float32 FMA's), the softmax in float32. One function
// serves a decode step's heads and a prefill chunk's blocks, so a token's attention has the same
// bits whichever way it was computed (a conversation's answer decoded, then prefilled again with
// the prefix cache off). D a multiple of 32, at most 256.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <cmath>

#include "vexp.h"

namespace adapterserve {

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// the 16 x 16 words of r transposed in place (r[i] lane j <-> r[j] lane i)
BF16_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// x[0 .. 32) as 32 bf16 (16 words: pairs x[2w], x[2w + 1]), from float32 or already bf16
BF16_TARGET inline __m512i bf16_words(const float* x) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
}
BF16_TARGET inline __m512i bf16_words(const uint16_t* x) { return _mm512_loadu_si512(x); }

// rows a[0 .. 16) and b[0 .. 16) as 32 bf16 (a's then b's); b null: zeros
BF16_TARGET inline __m512i bf16_halves(const float* a, const float* b) {
  return (__m512i)_mm512_cvtne2ps_pbh(b ? _mm512_loadu_ps(b) : _mm512_setzero_ps(), _mm512_loadu_ps(a));
}
BF16_TARGET inline __m512i bf16_halves(const uint16_t* a, const uint16_t* b) {
  const __m256i hi = b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)) : _mm256_setzero_si256();
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))), hi, 1);
}

// x[0 .. n) (n a multiple of 32) rounded to bf16 into y, as bf16_words rounds (a cache kept in bf16)
BF16_TARGET inline void store_bf16(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; i += 32) _mm512_storeu_si512(y + i, bf16_words(x + i));
}

// scores s[v][t0 .. t0 + 16) of N queries (their words qw[v], D / 2 each) against the key block kt
// (D / 2 vectors: lane i of kt[j] = key i's word j)
template <int N>
BF16_TARGET inline void block_scores(const uint32_t* qw, int64_t words, const __m512i* kt, float* s,
                                     int64_t T) {
  __m512 acc[N];
  for (int v = 0; v < N; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < words; ++j) {
    const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + j);
    for (int v = 0; v < N; ++v)
      acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_set1_epi32(qw[v * words + j]), k);
  }
  for (int v = 0; v < N; ++v) _mm512_storeu_ps(s + v * T, acc[v]);
}

// acc[v] [D] += the N queries' probability words pw[v] (pairs of columns) times the value pairs vp
// (pairs x D / 16 vectors: lane d of vp[p * C + c] = values (2p, 2p + 1) of dimension 16c + d)
template <int N>
BF16_TARGET inline void block_values(const uint32_t* pw, int64_t pstride, const __m512i* vp, int64_t pairs,
                                     int64_t C, float* acc, int64_t D) {
  for (int64_t c = 0; c < C; ++c) {
    __m512 x[N];
    for (int v = 0; v < N; ++v) x[v] = _mm512_loadu_ps(acc + v * D + 16 * c);
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(vp + p * C + c);
      for (int v = 0; v < N; ++v) x[v] = _mm512_dpbf16_ps(x[v], (__m512bh)_mm512_set1_epi32(pw[v * pstride + p]), w);
    }
    for (int v = 0; v < N; ++v) _mm512_storeu_ps(acc + v * D + 16 * c, x[v]);
  }
}

// Floats of scratch attend_bf16 needs for nq queries over T columns.
inline int64_t bf16_work(int64_t nq, int64_t T, int64_t D) {
  const int64_t Tp = (T + 31) / 32 * 32;
  return nq * D / 2 + nq * Tp + nq * Tp / 2 + nq * D + 16 * D + nq;
}

// out[v] [D] = softmax(q[v] . keys[t], t < limit[v] and mask[t]) . values[t] for nq queries q
// (float32, rotated and scaled, nq x D) of one key/value head: keys and values [T, D] rows, float32
// or bf16 (KV; t < T read), mask (T bytes, 0: masked) or null; query v's output at
// out + (v / rep) * stride + (v % rep) * D (rep heads a token, side by side; a token's heads stride
// apart). The same bits either way: float32 keys and values are rounded as a bf16 cache keeps them.
template <typename KV>
BF16_TARGET void attend_bf16(const float* q, int64_t nq, const KV* keys, const KV* values, int64_t T,
                             int64_t D, const int64_t* limit, const uint8_t* mask, float* out, int64_t rep,
                             int64_t stride, float* work) {
  const int64_t W = D / 2, C = D / 16, Tp = (T + 31) / 32 * 32;
  uint32_t* qw = reinterpret_cast<uint32_t*>(work);  // [nq, W]
  float* s = work + nq * W;                           // [nq, Tp]
  uint32_t* pw = reinterpret_cast<uint32_t*>(s + nq * Tp);  // [nq, Tp / 2]
  float* acc = s + nq * Tp + nq * Tp / 2;             // [nq, D]
  __m512i* kt = reinterpret_cast<__m512i*>(acc + nq * D);  // [W] (a key block) or [16 C] (values)
  for (int64_t v = 0; v < nq; ++v)
    for (int64_t c = 0; c < D; c += 32) _mm512_storeu_si512(qw + v * W + c / 2, bf16_words(q + v * D + c));
  // q . k, 16 keys at a time: the block's words transposed so that a lane is a key
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const int64_t n = T - t0 < 16 ? T - t0 : 16;
    for (int64_t c = 0; c < W; c += 16) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < n ? bf16_words(keys + (t0 + i) * D + 2 * c) : _mm512_setzero_si512();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kt + c + i, r[i]);
    }
    int64_t v = 0;
    for (; v + 8 <= nq; v += 8) block_scores<8>(qw + v * W, W, kt, s + v * Tp + t0, Tp);
    switch (nq - v) {
      case 7: block_scores<7>(qw + v * W, W, kt, s + v * Tp + t0, Tp); break;
      case 6: block_scores<6>(qw + v * W, W, kt, s + v * Tp + t0, Tp); break;
      case 5: block_scores<5>(qw + v * W, W, kt, s + v * Tp + t0, Tp); break;
      case 4: block_scores<4>(qw + v * W, W, kt, s + v * Tp + t0, Tp); break;
      case 3: block_scores<3>(qw + v * W, W, kt, s + v * Tp + t0, Tp); break;
      case 2: block_scores<2>(qw + v * W, W, kt, s + v * Tp + t0, Tp); break;
      case 1: block_scores<1>(qw + v * W, W, kt, s + v * Tp + t0, Tp); break;
      default: break;
    }
  }
  // softmax in float32; the probabilities as bf16 pairs of columns (zeros past each query's last)
  float* totals = reinterpret_cast<float*>(kt) + 16 * D;
  for (int64_t v = 0; v < nq; ++v) {
    float* sv = s + v * Tp;
    const int64_t L = limit[v];
    if (mask)
      for (int64_t t = 0; t < L; ++t)
        if (!mask[t]) sv[t] = -INFINITY;
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sv + t));
    float top = _mm512_reduce_max_ps(m);
    for (; t < L; ++t) top = sv[t] > top ? sv[t] : top;
    __m512 sum = _mm512_setzero_ps();
    const __m512 mt = _mm512_set1_ps(top);
    for (t = 0; t + 16 <= L; t += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sv + t), mt));
      _mm512_storeu_ps(sv + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum);
    for (; t < L; ++t) {
      sv[t] = std::exp(sv[t] - top);
      total += sv[t];
    }
    for (t = L; t < Tp; ++t) sv[t] = 0.f;
    totals[v] = total;
    for (t = 0; t < Tp; t += 32) _mm512_storeu_si512(pw + v * (Tp / 2) + t / 2, bf16_words(sv + t));
  }
  for (int64_t i = 0; i < nq * D; ++i) acc[i] = 0.f;
  // p . v, 16 pairs of columns at a time: value rows 2p and 2p + 1 interleaved per dimension
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512i* vp = kt;  // [16 pairs, C]
  for (int64_t u0 = 0; u0 < T; u0 += 32) {
    const int64_t pairs = (T - u0 + 1) / 2 < 16 ? (T - u0 + 1) / 2 : 16;
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t u = u0 + 2 * p;
      const bool second = u + 1 < T;
      for (int64_t c = 0; c < C; ++c) {
        const KV* a = values + u * D + 16 * c;
        const __m512i x = bf16_halves(a, second ? a + D : nullptr);
        _mm512_storeu_si512(vp + p * C + c, _mm512_permutexvar_epi16(interleave, x));
      }
    }
    const uint32_t* pu = pw + u0 / 2;
    int64_t v = 0;
    for (; v + 4 <= nq; v += 4) block_values<4>(pu + v * (Tp / 2), Tp / 2, vp, pairs, C, acc + v * D, D);
    switch (nq - v) {
      case 3: block_values<3>(pu + v * (Tp / 2), Tp / 2, vp, pairs, C, acc + v * D, D); break;
      case 2: block_values<2>(pu + v * (Tp / 2), Tp / 2, vp, pairs, C, acc + v * D, D); break;
      case 1: block_values<1>(pu + v * (Tp / 2), Tp / 2, vp, pairs, C, acc + v * D, D); break;
      default: break;
    }
  }
  for (int64_t v = 0; v < nq; ++v) {
    const float inv = 1.f / totals[v];
    float* o = out + (v / rep) * stride + (v % rep) * D;
    for (int64_t i = 0; i < D; ++i) o[i] = acc[v * D + i] * inv;
  }
}

}  // namespace adapterserve
