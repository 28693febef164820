// What attention.cpp's float32 paths share: the call's arguments, the rotary embedding of a head,
// vectorized softmax sums and 16 keys' scores at a time.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <cmath>

#include "vexp.h"

namespace adapterserve {

struct Attend {
  int64_t H, KV, D;
  const float* qkv;
  int64_t qkv_stride, q_off, k_off, v_off;
  const float* cos;  // [M, D]
  const float* sin;
  const float* q_norm;  // [D] or null
  const float* k_norm;
  float norm_eps;
  void* kbuf;  // float32, or bf16 (uint16_t) where kv_bf16
  void* vbuf;
  int64_t row_stride, head_stride, col;
  int kv_bf16;
  const uint8_t* mask;  // [M, mask_stride], the last T = col + 1 columns read, or null
  int64_t mask_stride;
  float scale;
  float* out;  // [M, H * D]
  int causal;  // rows are consecutive new tokens of one cache row: row r at column col + r
};

// the head x [D] normalized (if w) and rotated: x * cos + rotate_half(x) * sin
inline void rope_head(const float* x, const float* w, float eps, const float* cos, const float* sin, int64_t D,
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
__attribute__((target("avx512f,avx512dq"))) inline int64_t exp_sum_avx512(float* s, int64_t T, float top, float* total) {
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

__attribute__((target("avx2,fma"))) inline int64_t exp_sum_avx2(float* s, int64_t T, float top, float* total) {
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
__attribute__((target("avx512f,avx512dq"))) inline int64_t scores_avx512(const float* q, const float* keys, int64_t D,
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

}  // namespace adapterserve
