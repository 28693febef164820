// Each row's LoRA deltas for the native step (app/models/native_step.py): the adapters' A^T and
// B^T read where the slots hold them (float32, or int8 with a scale per rank), once per run of
// rows of one adapter. AVX-512 or AVX2 as q4_isa() answers. Plain C ABI.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

namespace {

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

}  // extern "C"
