// float32 LoRA weights for lora.cpp: A^T [K, rank], B^T [rank, out]; y += scale * (x . A^T) . B^T
// in float32, AVX-512 or AVX2. Internal to the kernel library.
#pragma once
#include <immintrin.h>
#include <stdint.h>

namespace adapterserve::lora_float {

// Rows of one adapter (n rows, x rows K apart, y rows ldy apart): t = x . A^T with each row's 16
// ranks in a register over K, then y's vectors with the n rows' sums over the rank in registers
// (n >= 4), or B^T row by row, one stream through memory (fewer rows).
template <int n>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void float_run_avx512(
    const float* x, int64_t K, const float* a, const float* b, int64_t rank, float scale, int64_t out, float* y,
    int64_t ldy, float* t) {
  constexpr int U = n == 1 ? 4 : n == 2 ? 2 : 1;  // (chains over K: a few rows leave the FMA units idle)
  for (int64_t j0 = 0; j0 < rank; j0 += 16) {
    const __mmask16 live = rank - j0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (rank - j0)) - 1);
    __m512 acc[n][U];
    for (int i = 0; i < n; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + U <= K; k += U)
      for (int u = 0; u < U; ++u) {
        const __m512 ak = _mm512_maskz_loadu_ps(live, a + (k + u) * rank + j0);
        for (int i = 0; i < n; ++i) acc[i][u] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k + u]), ak, acc[i][u]);
      }
    for (; k < K; ++k) {
      const __m512 ak = _mm512_maskz_loadu_ps(live, a + k * rank + j0);
      for (int i = 0; i < n; ++i) acc[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * K + k]), ak, acc[i][0]);
    }
    for (int i = 0; i < n; ++i) {
      __m512 sum = acc[i][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[i][u]);
      _mm512_mask_storeu_ps(t + i * rank + j0, live, _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
    }
  }
  const int64_t whole = out / 16 * 16;
  if constexpr (n >= 4) {
    for (int64_t o = 0; o < whole; o += 16) {
      __m512 acc[n];
      for (int i = 0; i < n; ++i) acc[i] = _mm512_loadu_ps(y + i * ldy + o);
      for (int64_t j = 0; j < rank; ++j) {
        const __m512 w = _mm512_loadu_ps(b + j * out + o);
        for (int i = 0; i < n; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[i * rank + j]), w, acc[i]);
      }
      for (int i = 0; i < n; ++i) _mm512_storeu_ps(y + i * ldy + o, acc[i]);
    }
  } else {
    for (int64_t j = 0; j < rank; ++j) {
      const float* bj = b + j * out;
      __m512 tj[n];
      for (int i = 0; i < n; ++i) tj[i] = _mm512_set1_ps(t[i * rank + j]);
      for (int64_t o = 0; o < whole; o += 16) {
        const __m512 w = _mm512_loadu_ps(bj + o);
        for (int i = 0; i < n; ++i) {
          float* yo = y + i * ldy + o;
          _mm512_storeu_ps(yo, _mm512_fmadd_ps(tj[i], w, _mm512_loadu_ps(yo)));
        }
      }
    }
  }
  for (int64_t j = 0; j < rank; ++j)
    for (int64_t o = whole; o < out; ++o)
      for (int i = 0; i < n; ++i) y[i * ldy + o] += t[i * rank + j] * b[j * out + o];
}

template <int n>
__attribute__((target("avx2,fma"))) void float_run_avx2(const float* x, int64_t K, const float* a, const float* b,
                                                       int64_t rank, float scale, int64_t out, float* y,
                                                       int64_t ldy, float* t) {
  int64_t j0 = 0;
  for (; j0 + 8 <= rank; j0 += 8) {
    __m256 acc[n];
    for (int i = 0; i < n; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 ak = _mm256_loadu_ps(a + k * rank + j0);
      for (int i = 0; i < n; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(x[i * K + k]), ak, acc[i]);
    }
    for (int i = 0; i < n; ++i) _mm256_storeu_ps(t + i * rank + j0, _mm256_mul_ps(acc[i], _mm256_set1_ps(scale)));
  }
  for (; j0 < rank; ++j0)
    for (int i = 0; i < n; ++i) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += x[i * K + k] * a[k * rank + j0];
      t[i * rank + j0] = sum * scale;
    }
  int64_t o = 0;
  for (; o + 8 <= out; o += 8) {
    __m256 acc[n];
    for (int i = 0; i < n; ++i) acc[i] = _mm256_loadu_ps(y + i * ldy + o);
    for (int64_t j = 0; j < rank; ++j) {
      const __m256 bj = _mm256_loadu_ps(b + j * out + o);
      for (int i = 0; i < n; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(t[i * rank + j]), bj, acc[i]);
    }
    for (int i = 0; i < n; ++i) _mm256_storeu_ps(y + i * ldy + o, acc[i]);
  }
  for (; o < out; ++o)
    for (int i = 0; i < n; ++i)
      for (int64_t j = 0; j < rank; ++j) y[i * ldy + o] += t[i * rank + j] * b[j * out + o];
}

}  // namespace adapterserve::lora_float
