// Each row's LoRA deltas for the native step (app/models/native_step.py): the adapters' weights
// read where the slots hold them, once per run of rows of one adapter; added by q4_linear after
// the base's product in the same call (the weights brought into the caches while the base's tiles
// compute), or alone by lora_rows. AVX-512 VNNI or AVX2 as q4_isa() answers. Plain C ABI.
//
// Three formats (app/kernels/lora_table.py):
// - float32: A^T [K, rank], B^T [rank, out]; y += scale * (x . A^T) . B^T in float32.
// - 8 bits for integer dot products: A^T's columns in blocks of 16 ranks, [rank/16][K/4][16][4]
//   (byte 4 lane + j of chunk k4: A^T[4 k4 + j][16 block + lane]), and B^T in tiles of 16
//   outputs, [out/16][rank/4][16][4] (byte 4 lane + j of chunk j4: B^T[4 j4 + j][16 tile + lane]),
//   both as u = q + 128 (q in -127..127, a scale per rank: sab = sa * sb). x is the base's 8-bit
//   rows (8 bits per group of 32, as the base multiplies them); t = x . A^T is summed in integers
//   per group, scaled per group, times sab and the scaling, rounded to 8 bits per row (one scale)
//   and multiplied by B^T in integers again. The rounding of x and t: ~1 % of the delta.
// - 4 bits (ADAPTERSERVE_LORA_BITS=4): the same sums on half the bytes, lora_int4.h.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lora.h"
#include "lora_float.h"
#include "lora_int4.h"

namespace adapterserve {

namespace {

constexpr int RUN = 8;        // rows of one adapter per task (their weights read once)
constexpr int QG = 32;        // inputs per scale of x

// ---- 8-bit weights ----------------------------------------------------------------------------
template <int n>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) void int8_run_avx512(
    const LoraCall& c, int64_t r, const uint8_t* a, const uint8_t* b, const float* sab, int64_t rank, float scale,
    int64_t out, float* y) {
  const int64_t K = c.K, G = K / QG;
  constexpr int C = n == 1 ? 4 : n <= 3 ? 2 : 1;  // (chains of vpdpbusd: its latency, for a few rows)
  alignas(64) float t[n][MAX_RANK];
  for (int64_t j0 = 0; j0 < rank; j0 += 16) {
    const uint8_t* aj = a + j0 * K;  // block j0 / 16: [K/4][16][4]
    __m512 f[n];
    for (int i = 0; i < n; ++i) f[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* ag = aj + g * QG * 16;
      __m512i acc[n][C];
      for (int i = 0; i < n; ++i)
        for (int u = 0; u < C; ++u) acc[i][u] = _mm512_setzero_si512();
      for (int k4 = 0; k4 < QG / 4; ++k4) {
        const __m512i w = _mm512_loadu_si512(ag + 64 * k4);
        for (int i = 0; i < n; ++i) {
          int32_t quad;
          memcpy(&quad, c.qx + (r + i) * K + g * QG + 4 * k4, 4);
          acc[i][k4 % C] = _mm512_dpbusd_epi32(acc[i][k4 % C], w, _mm512_set1_epi32(quad));
        }
      }
      for (int i = 0; i < n; ++i) {  // sum((q + 128) qx) - 128 sum(qx), exact in integers
        const int64_t e = (r + i) * G + g;
        __m512i s = _mm512_set1_epi32(-128 * c.sx[e]);
        for (int u = 0; u < C; ++u) s = _mm512_add_epi32(s, acc[i][u]);
        f[i] = _mm512_fmadd_ps(_mm512_set1_ps(c.dx[e]), _mm512_cvtepi32_ps(s), f[i]);
      }
    }
    const __m512 m = _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_loadu_ps(sab + j0));
    for (int i = 0; i < n; ++i) _mm512_store_ps(t[i] + j0, _mm512_mul_ps(f[i], m));
  }
  alignas(64) int8_t qt[n][MAX_RANK];
  float st[n];
  int32_t sum[n];
  for (int i = 0; i < n; ++i) round_t(t[i], rank, qt[i], st + i, sum + i);
  for (int64_t o = 0; o * 16 < out; ++o) {
    const uint8_t* bo = b + o * rank * 16;
    __m512i acc[n];
    for (int i = 0; i < n; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t j4 = 0; j4 < rank / 4; ++j4) {
      const __m512i w = _mm512_loadu_si512(bo + 64 * j4);
      for (int i = 0; i < n; ++i) {
        int32_t quad;
        memcpy(&quad, qt[i] + 4 * j4, 4);
        acc[i] = _mm512_dpbusd_epi32(acc[i], w, _mm512_set1_epi32(quad));
      }
    }
    const __mmask16 live = out - o * 16 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (out - o * 16)) - 1);
    for (int i = 0; i < n; ++i) {
      float* yo = y + i * c.ldy + o * 16;
      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], _mm512_set1_epi32(128 * sum[i])));
      _mm512_mask_storeu_ps(yo, live, _mm512_fmadd_ps(_mm512_set1_ps(st[i]), d, _mm512_maskz_loadu_ps(live, yo)));
    }
  }
}

// AVX2: the same in halves of 8 lanes; u8 x s8 products as |x| x sign(x) q (vpmaddubsw would
// saturate on 255 x 127 pairs), so no correction for the + 128
__attribute__((target("avx2,fma"), always_inline)) inline __m256i dot4(__m256i w, int32_t quad) {
  const __m256i xq = _mm256_set1_epi32(quad);
  const __m256i q = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(xq), _mm256_sign_epi8(q, xq)), _mm256_set1_epi16(1));
}

template <int n>
__attribute__((target("avx2,fma"))) void int8_run_avx2(const LoraCall& c, int64_t r, const uint8_t* a,
                                                      const uint8_t* b, const float* sab, int64_t rank,
                                                      float scale, int64_t out, float* y) {
  const int64_t K = c.K, G = K / QG;
  alignas(32) float t[n][MAX_RANK];
  for (int64_t j0 = 0; j0 < rank; j0 += 8) {
    const uint8_t* aj = a + (j0 / 16) * 16 * K + 32 * ((j0 / 8) % 2);
    __m256 f[n];
    for (int i = 0; i < n; ++i) f[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* ag = aj + g * QG * 16;
      __m256i acc[n];
      for (int i = 0; i < n; ++i) acc[i] = _mm256_setzero_si256();
      for (int k4 = 0; k4 < QG / 4; ++k4) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ag + 64 * k4));
        for (int i = 0; i < n; ++i) {
          int32_t quad;
          memcpy(&quad, c.qx + (r + i) * K + g * QG + 4 * k4, 4);
          acc[i] = _mm256_add_epi32(acc[i], dot4(w, quad));
        }
      }
      for (int i = 0; i < n; ++i)
        f[i] = _mm256_fmadd_ps(_mm256_set1_ps(c.dx[(r + i) * G + g]), _mm256_cvtepi32_ps(acc[i]), f[i]);
    }
    const __m256 m = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_loadu_ps(sab + j0));
    for (int i = 0; i < n; ++i) _mm256_store_ps(t[i] + j0, _mm256_mul_ps(f[i], m));
  }
  alignas(32) int8_t qt[n][MAX_RANK];
  float st[n];
  int32_t sum[n];
  for (int i = 0; i < n; ++i) round_t(t[i], rank, qt[i], st + i, sum + i);
  for (int64_t o = 0; o * 8 < out; ++o) {
    const uint8_t* bo = b + (o / 2) * rank * 16 + 32 * (o % 2);
    __m256i acc[n];
    for (int i = 0; i < n; ++i) acc[i] = _mm256_setzero_si256();
    for (int64_t j4 = 0; j4 < rank / 4; ++j4) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bo + 64 * j4));
      for (int i = 0; i < n; ++i) {
        int32_t quad;
        memcpy(&quad, qt[i] + 4 * j4, 4);
        acc[i] = _mm256_add_epi32(acc[i], dot4(w, quad));
      }
    }
    const int64_t live = out - o * 8 < 8 ? out - o * 8 : 8;
    for (int i = 0; i < n; ++i) {
      float* yo = y + i * c.ldy + o * 8;
      alignas(32) float d[8];
      _mm256_store_ps(d, _mm256_mul_ps(_mm256_set1_ps(st[i]), _mm256_cvtepi32_ps(acc[i])));
      for (int64_t l = 0; l < live; ++l) yo[l] += d[l];
    }
  }
}

const int64_t* entry(const LoraCall& c, int64_t r, int64_t p) { return c.table + LORA_ENTRY * (r * c.P + p); }
// an entry's format: 32 (float32), 8 or 4 bits
int entry_bits(const int64_t* e) { return e[4] == 4 ? 4 : e[3] != 0 ? 8 : 32; }

// bytes of an entry's A and B
int64_t a_bytes(const LoraCall& c, const int64_t* e) {
  const int bits = entry_bits(e);
  return bits == 4 ? c.K * e[2] * 9 / 16 : c.K * e[2] * (bits == 8 ? 1 : 4);
}
int64_t b_bytes(const LoraCall& c, const int64_t* e, int64_t p) {
  const int bits = entry_bits(e);
  const int64_t tiles = (c.outs[p] + 15) / 16;
  return bits == 4 ? tiles * 10 * e[2] : bits == 8 ? tiles * 16 * e[2] : c.outs[p] * e[2] * 4;
}

template <int n>
void run_task(const LoraCall& c, int64_t p, int64_t r) {
  const int64_t* e = entry(c, r, p);
  const float scale = c.scales[r * c.P + p];
  float* y = c.y + r * c.ldy + c.offsets[p];
  const int64_t rank = e[2], out = c.outs[p];
  const int bits = entry_bits(e);
  if (bits < 32) {
    const auto* a = reinterpret_cast<const uint8_t*>(e[0]);
    const auto* b = reinterpret_cast<const uint8_t*>(e[1]);
    const auto* sab = reinterpret_cast<const float*>(e[3]);  // (8 bits)
    if (bits == 4 && c.isa == 2)
      lora_int4::int4_run_avx512<n>(c, r, a, b, rank, scale, out, y);
    else if (bits == 4)
      lora_int4::int4_run_avx2<n>(c, r, a, b, rank, scale, out, y);
    else if (c.isa == 2)
      int8_run_avx512<n>(c, r, a, b, sab, rank, scale, out, y);
    else
      int8_run_avx2<n>(c, r, a, b, sab, rank, scale, out, y);
    return;
  }
  thread_local std::vector<float> t;
  if (static_cast<int64_t>(t.size()) < RUN * rank) t.resize(RUN * rank);
  const auto* a = reinterpret_cast<const float*>(e[0]);
  const auto* b = reinterpret_cast<const float*>(e[1]);
  if (c.isa == 2)
    lora_float::float_run_avx512<n>(c.x + r * c.K, c.K, a, b, rank, scale, out, y, c.ldy, t.data());
  else
    lora_float::float_run_avx2<n>(c.x + r * c.K, c.K, a, b, rank, scale, out, y, c.ldy, t.data());
}

}  // namespace

void lora_plan(const LoraCall& c, int threads, std::vector<int64_t>& tasks) {
  tasks.clear();
  const auto same = [&](int64_t r, int64_t s) {
    for (int64_t p = 0; p < c.P; ++p) {
      const int64_t *e = entry(c, r, p), *f = entry(c, s, p);
      for (int i = 0; i < LORA_ENTRY; ++i)
        if (e[i] != f[i]) return false;
      if (c.scales[r * c.P + p] != c.scales[s * c.P + p]) return false;
    }
    return true;
  };
  std::vector<int64_t> load(threads, 0);
  for (int64_t r = 0; r < c.M;) {
    int64_t n = 1;
    while (r + n < c.M && n < RUN && same(r, r + n)) ++n;
    for (int64_t p = 0; p < c.P; ++p) {
      const int64_t* e = entry(c, r, p);
      if (e[2] == 0) continue;
      const int id = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
      load[id] += a_bytes(c, e) + b_bytes(c, e, p);
      tasks.insert(tasks.end(), {p, r, n, id});
    }
    r += n;
  }
}

void lora_spans(const LoraCall& c, const std::vector<int64_t>& tasks, int id, std::vector<int64_t>& spans) {
  spans.clear();
  for (size_t i = 0; i < tasks.size(); i += 4) {
    if (tasks[i + 3] != id) continue;
    const int64_t p = tasks[i];
    const int64_t* e = entry(c, tasks[i + 1], p);
    spans.insert(spans.end(), {e[0], a_bytes(c, e), e[1], b_bytes(c, e, p)});
  }
}

void lora_run(const LoraCall& c, const std::vector<int64_t>& tasks, int id) {
  for (size_t i = 0; i < tasks.size(); i += 4) {
    if (tasks[i + 3] != id) continue;
    const int64_t p = tasks[i], r = tasks[i + 1];
    switch (tasks[i + 2]) {
#define LORA_RUN(N)      \
  case N:                \
    run_task<N>(c, p, r); \
    break;
      LORA_RUN(1) LORA_RUN(2) LORA_RUN(3) LORA_RUN(4) LORA_RUN(5) LORA_RUN(6) LORA_RUN(7) LORA_RUN(8)
#undef LORA_RUN
    }
  }
}

void Prefetcher::step() {
  if (wait > 0) {
    --wait;
    return;
  }
  int64_t left = per;
  while (left > 0 && i < count) {
    const char* p = reinterpret_cast<const char*>(spans[2 * i]);
    const int64_t len = spans[2 * i + 1];
    for (; off < len && left > 0; off += 64, left -= 64) _mm_prefetch(p + off, _MM_HINT_T1);
    if (off >= len) {
      ++i;
      off = 0;
    }
  }
}

}  // namespace adapterserve

extern "C" {

// Each row's LoRA deltas for the P parts of a group: for row r and part p, y[r, offsets[p] :+
// outs[p]] += scales[r, p] * (x[r] . A) . B, the weights at table[r, p] = (A, B, rank, sab, 0;
// rank 0: no delta), float32 (sab 0) or 8 bits (the layouts above).
void lora_rows(int isa, int64_t M, int64_t P, const float* x, int64_t K, float* y, int64_t ldy,
               const int64_t* table, const float* scales, const int64_t* offsets, const int64_t* outs) {
  using namespace adapterserve;
  thread_local std::vector<int8_t> qx;
  thread_local std::vector<float> dx;
  thread_local std::vector<int32_t> sx;
  thread_local std::vector<int64_t> tasks;
  const int64_t G = K / QG;
  qx.resize(M * K);
  dx.resize(2 * M * G);
  sx.resize(M * G);
  quantize_x(isa, x, M, K, qx.data(), dx.data(), dx.data() + M * G, sx.data());
  const LoraCall c{isa, M, P, K, x, qx.data(), dx.data(), sx.data(), y, ldy, table, scales, offsets, outs};
  const int threads = omp_get_max_threads();
  lora_plan(c, threads, tasks);
  const std::vector<int64_t>& plan = tasks;  // (this thread's: the team reads it through this)
  const bool split = plan.size() >= 8;
#pragma omp parallel if (split)
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    for (int t = id; t < threads; t += n) lora_run(c, plan, t);
  }
}

}  // extern "C"
