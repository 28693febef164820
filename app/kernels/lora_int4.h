// 4-bit LoRA weights for lora.cpp (app/kernels/lora_table.py: Lora4): per block of 16 ranks of
// A^T, its [K/8][16][4] bytes (byte 4 lane + j of chunk k: input 8 k + j of rank lane in the low
// nibble, 8 k + 4 + j in the high one) then bf16 scales [K/32][16]; per tile of 16 outputs of B^T,
// its [rank/8][16][4] bytes (ranks 8 k + j and 8 k + 4 + j of output lane) then bf16 scales
// [rank/16][16]; values q + 8. As the 8-bit format: x . A^T on the base's 8-bit rows, summed in
// integers per group of 32 inputs (the + 8 taken off exactly with the group's sum of x) and
// scaled per group and rank; t rounded to 8 bits per row; t . B^T summed in integers per 16 ranks
// and scaled per output. AVX-512 VNNI or AVX2. Internal to the kernel library.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "lora.h"

namespace adapterserve::lora_int4 {

constexpr int QG = 32;  // inputs per scale of x and of A^T

// bf16 [16] -> float
__attribute__((target("avx512f"), always_inline)) inline __m512 bf16x16(const uint8_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx2"), always_inline)) inline __m256 bf16x8(const uint8_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline int32_t quad_at(const int8_t* p) {
  int32_t q;
  memcpy(&q, p, 4);
  return q;
}

// t [n][rank] of the rows -> 8 bits (round_t) and each 16 ranks' sum of them
template <int n>
void round_rows(const float (*t)[MAX_RANK], int64_t rank, int8_t (*qt)[MAX_RANK], float* st,
                int32_t (*sums)[MAX_RANK / 16]) {
  for (int i = 0; i < n; ++i) {
    int32_t all;
    round_t(t[i], rank, qt[i], st + i, &all);
    for (int64_t g = 0; g < rank / 16; ++g) {
      int32_t s = 0;
      for (int j = 0; j < 16; ++j) s += qt[i][16 * g + j];
      sums[i][g] = s;
    }
  }
}

template <int n>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) void int4_run_avx512(
    const LoraCall& c, int64_t r, const uint8_t* a, const uint8_t* b, int64_t rank, float scale, int64_t out,
    float* y) {
  const int64_t K = c.K, G = K / QG;
  constexpr int C = n == 1 ? 4 : n <= 3 ? 2 : 1;  // (chains of vpdpbusd: its latency, for a few rows)
  const __m512i low = _mm512_set1_epi8(0x0F);
  alignas(64) float t[n][MAX_RANK];
  for (int64_t j0 = 0; j0 < rank; j0 += 16) {
    const uint8_t* blk = a + (j0 / 16) * 9 * K;
    const uint8_t* sa = blk + 8 * K;
    __m512 f[n];
    for (int i = 0; i < n; ++i) f[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512i acc[n][C];
      for (int i = 0; i < n; ++i)
        for (int u = 0; u < C; ++u) acc[i][u] = _mm512_setzero_si512();
      for (int k = 0; k < QG / 8; ++k) {
        const __m512i v = _mm512_loadu_si512(blk + 256 * g + 64 * k);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int i = 0; i < n; ++i) {
          const int8_t* xq = c.qx + (r + i) * K + g * QG + 8 * k;
          __m512i& s = acc[i][k % C];
          s = _mm512_dpbusd_epi32(s, lo, _mm512_set1_epi32(quad_at(xq)));
          s = _mm512_dpbusd_epi32(s, hi, _mm512_set1_epi32(quad_at(xq + 4)));
        }
      }
      const __m512 w = bf16x16(sa + 32 * g);
      for (int i = 0; i < n; ++i) {  // sum((q + 8) qx) - 8 sum(qx)
        const int64_t e = (r + i) * G + g;
        __m512i s = _mm512_set1_epi32(-8 * c.sx[e]);
        for (int u = 0; u < C; ++u) s = _mm512_add_epi32(s, acc[i][u]);
        f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(w, _mm512_set1_ps(c.dx[e])), f[i]);
      }
    }
    for (int i = 0; i < n; ++i) _mm512_store_ps(t[i] + j0, _mm512_mul_ps(f[i], _mm512_set1_ps(scale)));
  }
  alignas(64) int8_t qt[n][MAX_RANK];
  float st[n];
  int32_t sums[n][MAX_RANK / 16];
  round_rows<n>(t, rank, qt, st, sums);
  for (int64_t o = 0; o * 16 < out; ++o) {
    const uint8_t* tile = b + o * 10 * rank;
    __m512 d[n];
    for (int i = 0; i < n; ++i) d[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < rank / 16; ++g) {
      __m512i acc[n];
      for (int i = 0; i < n; ++i) acc[i] = _mm512_set1_epi32(-8 * sums[i][g]);
      for (int k = 0; k < 2; ++k) {
        const __m512i v = _mm512_loadu_si512(tile + 128 * g + 64 * k);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int i = 0; i < n; ++i) {
          const int8_t* tq = qt[i] + 16 * g + 8 * k;
          acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_set1_epi32(quad_at(tq)));
          acc[i] = _mm512_dpbusd_epi32(acc[i], hi, _mm512_set1_epi32(quad_at(tq + 4)));
        }
      }
      const __m512 w = bf16x16(tile + 8 * rank + 32 * g);
      for (int i = 0; i < n; ++i) d[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), w, d[i]);
    }
    const __mmask16 live = out - o * 16 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (out - o * 16)) - 1);
    for (int i = 0; i < n; ++i) {
      float* yo = y + i * c.ldy + o * 16;
      _mm512_mask_storeu_ps(yo, live, _mm512_fmadd_ps(_mm512_set1_ps(st[i]), d[i], _mm512_maskz_loadu_ps(live, yo)));
    }
  }
}

// u [32] (values < 16) . 4 signed bytes at q, repeated: 8 sums of 4 products
__attribute__((target("avx2"), always_inline)) inline __m256i dot(__m256i u, const int8_t* q) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_set1_epi32(quad_at(q))), _mm256_set1_epi16(1));
}

// AVX2: the same in halves of 8 lanes (bytes 32 h.. of each 64-byte chunk; scales 8 h..); u4 x s8
// products on vpmaddubsw (15 x 128 x 2 stays within 16 bits)
template <int n>
__attribute__((target("avx2,fma"))) void int4_run_avx2(const LoraCall& c, int64_t r, const uint8_t* a,
                                                      const uint8_t* b, int64_t rank, float scale, int64_t out,
                                                      float* y) {
  const int64_t K = c.K, G = K / QG;
  const __m256i low = _mm256_set1_epi8(0x0F);
  alignas(32) float t[n][MAX_RANK];
  for (int64_t j0 = 0; j0 < rank; j0 += 8) {
    const int64_t h = (j0 / 8) % 2;
    const uint8_t* blk = a + (j0 / 16) * 9 * K;
    const uint8_t* sa = blk + 8 * K + 16 * h;
    __m256 f[n];
    for (int i = 0; i < n; ++i) f[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256i acc[n];
      for (int i = 0; i < n; ++i) acc[i] = _mm256_set1_epi32(-8 * c.sx[(r + i) * G + g]);
      for (int k = 0; k < QG / 8; ++k) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 256 * g + 64 * k + 32 * h));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int i = 0; i < n; ++i) {
          const int8_t* xq = c.qx + (r + i) * K + g * QG + 8 * k;
          acc[i] = _mm256_add_epi32(acc[i], _mm256_add_epi32(dot(lo, xq), dot(hi, xq + 4)));
        }
      }
      const __m256 w = bf16x8(sa + 32 * g);
      for (int i = 0; i < n; ++i)
        f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), _mm256_mul_ps(w, _mm256_set1_ps(c.dx[(r + i) * G + g])), f[i]);
    }
    for (int i = 0; i < n; ++i) _mm256_store_ps(t[i] + j0, _mm256_mul_ps(f[i], _mm256_set1_ps(scale)));
  }
  alignas(32) int8_t qt[n][MAX_RANK];
  float st[n];
  int32_t sums[n][MAX_RANK / 16];
  round_rows<n>(t, rank, qt, st, sums);
  for (int64_t o8 = 0; o8 * 8 < out; ++o8) {
    const int64_t h = o8 % 2;
    const uint8_t* tile = b + (o8 / 2) * 10 * rank;
    __m256 d[n];
    for (int i = 0; i < n; ++i) d[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < rank / 16; ++g) {
      __m256i acc[n];
      for (int i = 0; i < n; ++i) acc[i] = _mm256_set1_epi32(-8 * sums[i][g]);
      for (int k = 0; k < 2; ++k) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 128 * g + 64 * k + 32 * h));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int i = 0; i < n; ++i) {
          const int8_t* tq = qt[i] + 16 * g + 8 * k;
          acc[i] = _mm256_add_epi32(acc[i], _mm256_add_epi32(dot(lo, tq), dot(hi, tq + 4)));
        }
      }
      const __m256 w = bf16x8(tile + 8 * rank + 32 * g + 16 * h);
      for (int i = 0; i < n; ++i) d[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), w, d[i]);
    }
    const int64_t live = out - o8 * 8 < 8 ? out - o8 * 8 : 8;
    for (int i = 0; i < n; ++i) {
      float* yo = y + i * c.ldy + o8 * 8;
      alignas(32) float v[8];
      _mm256_store_ps(v, _mm256_mul_ps(_mm256_set1_ps(st[i]), d[i]));
      for (int64_t l = 0; l < live; ++l) yo[l] += v[l];
    }
  }
}

}  // namespace adapterserve::lora_int4
