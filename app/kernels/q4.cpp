// adapterserve's 4-bit CPU matmul: y[M, N] = x[M, K] . W^T (+ bias), with W in 4-bit groups of 32
// along K (w = d * q + m, q in 0..15, d and m in fp16 per group and output: llama.cpp's Q4_1) and
// x rounded to 8 bits per group of 32 (x ~ dx * qx, qx in -127..127: llama.cpp's Q8_1). Each
// group's dot product is an integer one (u8 x s8: VNNI's vpdpbusd on AVX-512, vpmaddubsw +
// vpmaddwd on AVX2) scaled once: sum(w * x) = d * dx * sum(q * qx) + m * dx * sum(qx).
//
// The same kernel takes 8-bit weights (w = d * (u - 128), u in 1..255, d per group and output: the
// tied embeddings and LM head of an int4 base), a byte each: 8 chunks of 64 bytes per group.
//
// Weights are laid out in tiles of 16 outputs: for tile t and group g, 4 chunks of 64 bytes; byte
// (lane * 4 + j) of chunk c holds q[16t + lane][32g + 8c + j] in its low nibble and
// q[16t + lane][32g + 8c + 4 + j] in its high one (4 consecutive inputs per 32-bit lane, as
// vpdpbusd sums them). Scales: fp16 [tiles][groups][2][16] (d, then m). The weights of a tile are
// read once for every row of the call (rows in blocks that fit the registers), so a few rows cost
// little more than one. Tiles are shared out over torch's OpenMP threads.
//
// Plain C ABI (called through ctypes); compiled at first use by app/kernels/__init__.py.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "lora.h"
#include "vexp.h"

namespace {

using adapterserve::exp256;
using adapterserve::exp512;

constexpr int GROUP = 32;
constexpr int TILE = 16;
// bytes of one group of one tile: 4-bit weights two to a byte, 8-bit ones a byte each
template <int BITS>
constexpr int TILE_BYTES = BITS == 4 ? 4 * 64 : 8 * 64;
constexpr int PREFETCH = 2048;  // bytes ahead

// x [M, K] -> qx [M, K] int8, per row and group: dx (scale) and dx * sum(qx) (the group's sum;
// sum(qx) itself into isum when not null: the LoRA deltas' integer correction, lora.cpp).
// Rounding: x / dx to the nearest integer, ties to even (as torch.round), in IEEE float32.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* qx, float* dx, float* dsum, int32_t* isum) {
  const int64_t G = K / GROUP;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* v = x + r * K + g * GROUP;
      float amax = 0.f;
      for (int i = 0; i < GROUP; ++i) amax = std::fmax(amax, std::fabs(v[i]));
      const float d = amax / 127.f;
      int sum = 0;
      int8_t* q = qx + r * K + g * GROUP;
      for (int i = 0; i < GROUP; ++i) {
        float t = d > 0.f ? std::nearbyint(v[i] / d) : 0.f;
        t = std::fmin(127.f, std::fmax(-127.f, t));
        q[i] = static_cast<int8_t>(t);
        sum += q[i];
      }
      dx[r * G + g] = d;
      dsum[r * G + g] = d * static_cast<float>(sum);
      if (isum != nullptr) isum[r * G + g] = sum;
    }
  }
}

// the same, 16 floats at a time (the results are the same bits)
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_rows_avx512(
    const float* x, int64_t M, int64_t K, int8_t* qx, float* dx, float* dsum, int32_t* isum) {
  const int64_t G = K / GROUP;
  const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (int64_t i = 0; i < M * G; ++i) {
    const float* v = x + i * GROUP;
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.f;
    int8_t* q = qx + i * GROUP;
    if (!(d > 0.f)) {
      memset(q, 0, GROUP);
      dx[i] = d;
      dsum[i] = 0.f;
      if (isum != nullptr) isum[i] = 0;
      continue;
    }
    const __m512 dv = _mm512_set1_ps(d);
    const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 ra = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(_mm512_div_ps(a, dv), r)));
    const __m512 rb = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(_mm512_div_ps(b, dv), r)));
    const __m512i ia = _mm512_cvtps_epi32(ra), ib = _mm512_cvtps_epi32(rb);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(ia));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(ib));
    dx[i] = d;
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
    dsum[i] = d * static_cast<float>(sum);
    if (isum != nullptr) isum[i] = sum;
  }
}

// x / sqrt(mean(x^2) + eps) * w, per row of K (float32, as PyTorch's RMS norm computes it)
void rms_norm_rows(const float* x, int64_t M, int64_t K, const float* w, float eps, float* y) {
  for (int64_t r = 0; r < M; ++r) {
    const float* v = x + r * K;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < K; ++i) sum += v[i] * v[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(K) + eps);
    float* o = y + r * K;
#pragma omp simd
    for (int64_t i = 0; i < K; ++i) o[i] = w[i] * (v[i] * inv);
  }
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

void swiglu_rows(int isa, const float* x, int64_t M, int64_t K, float* y) {
  for (int64_t r = 0; r < M; ++r) {
    if (isa == 2)
      swiglu_avx512(x + r * 2 * K, x + r * 2 * K + K, K, y + r * K);
    else
      swiglu_avx2(x + r * 2 * K, x + r * 2 * K + K, K, y + r * K);
  }
}

template <int BITS>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl"))) void tiles_avx512(
    const int8_t* qx, const float* dx, const float* dsum, int64_t M, int64_t K, int64_t N,
    const uint8_t* w, const uint16_t* sm, const float* bias, float* y, bool acc, int64_t t0, int64_t t1,
    adapterserve::Prefetcher& pf) {
  constexpr int R = 8;
  const int64_t G = K / GROUP;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w + t * G * TILE_BYTES<BITS>;
    const uint16_t* st = sm + t * G * 2 * TILE;
    for (int64_t r0 = 0; r0 < M; r0 += R) {
      const int rows = static_cast<int>(M - r0 < R ? M - r0 : R);
      __m512 out[R];
      for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* wg = wt + g * TILE_BYTES<BITS>;
        for (int c = 0; c < TILE_BYTES<BITS>; c += 64)
          _mm_prefetch(reinterpret_cast<const char*>(wg + PREFETCH + c), _MM_HINT_T0);
        pf.step();
        __m512i q[8];
        if constexpr (BITS == 4) {
          for (int c = 0; c < 4; ++c) {
            const __m512i v = _mm512_loadu_si512(wg + 64 * c);
            q[2 * c] = _mm512_and_si512(v, low);
            q[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          }
        } else {
          for (int c = 0; c < 8; ++c) q[c] = _mm512_loadu_si512(wg + 64 * c);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + g * 32)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + g * 32 + 16)));
        for (int r = 0; r < rows; ++r) {
          const int8_t* xr = qx + (r0 + r) * K + g * GROUP;
          __m512i part[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                             _mm512_setzero_si512()};  // (four chains: vpdpbusd's latency)
          for (int k = 0; k < 8; ++k) {
            int32_t quad;
            memcpy(&quad, xr + 4 * k, 4);
            part[k % 4] = _mm512_dpbusd_epi32(part[k % 4], q[k], _mm512_set1_epi32(quad));
          }
          const __m512i acc = _mm512_add_epi32(_mm512_add_epi32(part[0], part[1]), _mm512_add_epi32(part[2], part[3]));
          const int64_t i = (r0 + r) * G + g;
          const __m512 scaled = _mm512_mul_ps(d, _mm512_set1_ps(dx[i]));
          out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scaled, out[r]);
          out[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(dsum[i]), out[r]);
        }
      }
      const __m512 b = bias ? _mm512_loadu_ps(bias + t * TILE) : _mm512_setzero_ps();
      for (int r = 0; r < rows; ++r) {
        float* yr = y + (r0 + r) * N + t * TILE;
        const __m512 v = _mm512_add_ps(out[r], b);
        _mm512_storeu_ps(yr, acc ? _mm512_add_ps(_mm512_loadu_ps(yr), v) : v);
      }
    }
  }
}

template <int BITS>
__attribute__((target("avx2,fma,f16c"))) void tiles_avx2(
    const int8_t* qx, const float* dx, const float* dsum, int64_t M, int64_t K, int64_t N,
    const uint8_t* w, const uint16_t* sm, const float* bias, float* y, bool acc, int64_t t0, int64_t t1,
    adapterserve::Prefetcher& pf) {
  constexpr int R = 4;
  const int64_t G = K / GROUP;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w + t * G * TILE_BYTES<BITS>;
    const uint16_t* st = sm + t * G * 2 * TILE;
    for (int half = 0; half < 2; ++half) {  // outputs 0-7, then 8-15 of the tile
      for (int64_t r0 = 0; r0 < M; r0 += R) {
        const int rows = static_cast<int>(M - r0 < R ? M - r0 : R);
        __m256 out[R];
        for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* wg = wt + g * TILE_BYTES<BITS> + 32 * half;
          pf.step();
          __m256i q[8];
          if constexpr (BITS == 4) {
            for (int c = 0; c < 4; ++c) {
              const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * c));
              q[2 * c] = _mm256_and_si256(v, low);
              q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
          } else {  // as signed bytes (u - 128): vpmaddubsw would saturate on 255 x 127 pairs
            const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
            for (int c = 0; c < 8; ++c)
              q[c] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * c)), flip);
          }
          const uint16_t* sg = st + g * 32 + 8 * half;
          const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg)));
          const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + 16)));
          for (int r = 0; r < rows; ++r) {
            const int8_t* xr = qx + (r0 + r) * K + g * GROUP;
            __m256i part[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int k = 0; k < 8; ++k) {
              int32_t quad;
              memcpy(&quad, xr + 4 * k, 4);
              const __m256i xq = _mm256_set1_epi32(quad);
              const __m256i prod = BITS == 4 ? _mm256_maddubs_epi16(q[k], xq)
                                             : _mm256_maddubs_epi16(_mm256_abs_epi8(xq), _mm256_sign_epi8(q[k], xq));
              part[k % 2] = _mm256_add_epi32(part[k % 2], _mm256_madd_epi16(prod, ones));
            }
            const __m256i acc = _mm256_add_epi32(part[0], part[1]);
            const int64_t i = (r0 + r) * G + g;
            const __m256 scaled = _mm256_mul_ps(d, _mm256_set1_ps(dx[i]));
            out[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scaled, out[r]);
            if constexpr (BITS == 4)  // (8 bits: the signed products already are the weights' own)
              out[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(dsum[i]), out[r]);
          }
        }
        const __m256 b = bias ? _mm256_loadu_ps(bias + t * TILE + 8 * half) : _mm256_setzero_ps();
        for (int r = 0; r < rows; ++r) {
          float* yr = y + (r0 + r) * N + t * TILE + 8 * half;
          const __m256 v = _mm256_add_ps(out[r], b);
          _mm256_storeu_ps(yr, acc ? _mm256_add_ps(_mm256_loadu_ps(yr), v) : v);
        }
      }
    }
  }
}

}  // namespace

namespace adapterserve {
void quantize_x(int isa, const float* x, int64_t M, int64_t K, int8_t* qx, float* dx, float* dsum,
                int32_t* isum) {
  if (isa == 2)
    quantize_rows_avx512(x, M, K, qx, dx, dsum, isum);
  else
    quantize_rows(x, M, K, qx, dx, dsum, isum);
}
}  // namespace adapterserve

extern "C" {

void q4_linear(int isa, int bits, int prologue, const float* x, int64_t M, int64_t K, int64_t N,
               const float* pw, float eps, float* xn, const uint8_t* w, const uint16_t* sm,
               const float* bias, int accumulate, float* y, const int64_t* lora, int64_t parts,
               const float* lora_scales, const int64_t* offsets, const int64_t* outs);

// 2: AVX-512 VNNI, 1: AVX2, 0: neither (the kernel cannot run here)
int q4_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return 1;
  return 0;
}

// y [M, N] = x [M, K] . W^T (+ bias [N] or null); isa as q4_isa() answers (or lower); bits: 4 or 8
void q4_matmul(int isa, int bits, const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* w,
               const uint16_t* sm, const float* bias, float* y) {
  q4_linear(isa, bits, 0, x, M, K, N, nullptr, 0.f, nullptr, w, sm, bias, 0, y, nullptr, 0, nullptr, nullptr,
            nullptr);
}

// The same with what a decoder layer does around it, in one call:
// - prologue 0: x [M, K] as it is; 1: RMS norm of x [M, K] (x / sqrt(mean(x^2) + eps) * pw [K]);
//   2: SwiGLU of x [M, 2K] (silu(x[:, :K]) * x[:, K:]); the rows multiplied are written to xn
//   [M, K] (the adapters' input) when xn is not null;
// - accumulate: y += the product (a residual stream) instead of y = it;
// - lora (or null): each row's LoRA deltas of the rows multiplied added to y, as lora_rows adds
//   them (lora.cpp: its table, parts, scalings, the parts' offsets and widths in y), after the
//   tiles, by the same threads; each thread brings its adapters' weights into the caches while
//   its tiles compute.
void q4_linear(int isa, int bits, int prologue, const float* x, int64_t M, int64_t K, int64_t N,
               const float* pw, float eps, float* xn, const uint8_t* w, const uint16_t* sm,
               const float* bias, int accumulate, float* y, const int64_t* lora, int64_t parts,
               const float* lora_scales, const int64_t* offsets, const int64_t* outs) {
  const int64_t G = K / GROUP;
  thread_local std::vector<int8_t> qx;
  thread_local std::vector<float> scales;
  thread_local std::vector<float> rows;
  if (prologue != 0) {
    if (xn == nullptr) {
      rows.resize(M * K);
      xn = rows.data();
    }
    if (prologue == 1)
      rms_norm_rows(x, M, K, pw, eps, xn);
    else
      swiglu_rows(isa, x, M, K, xn);
    x = xn;
  }
  qx.resize(M * K);
  scales.resize(2 * M * G);
  float* dx = scales.data();
  float* dsum = dx + M * G;
  thread_local std::vector<int32_t> sums;
  if (lora != nullptr) sums.resize(M * G);
  adapterserve::quantize_x(isa, x, M, K, qx.data(), dx, dsum, lora != nullptr ? sums.data() : nullptr);
  const int64_t tiles = N / TILE;
  const int8_t* q = qx.data();
  const bool acc = accumulate != 0;
  // threads share the tiles; a call too small to split stays on this thread
  // (an if clause, not num_threads: torch's thread pool keeps one team size)
  const bool split = tiles >= 4 && tiles * M * K >= (1 << 13);
  thread_local std::vector<int64_t> tasks;
  const int threads = split ? omp_get_max_threads() : 1;
  const adapterserve::LoraCall call{isa, M, parts, K, x, q, dx, sums.data(), y, N, lora, lora_scales, offsets, outs};
  if (lora != nullptr) adapterserve::lora_plan(call, threads, tasks);
  const std::vector<int64_t>& plan = tasks;  // (this thread's: the team reads it through this)
#pragma omp parallel if (split)
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (tiles + n - 1) / n;
    const int64_t t0 = id * per, t1 = t0 + per < tiles ? t0 + per : tiles;
    thread_local std::vector<int64_t> spans;
    adapterserve::Prefetcher pf;
    if (lora != nullptr && t1 > t0) {  // this thread's adapters' bytes, spread over its tiles' groups
      spans.clear();
      thread_local std::vector<int64_t> mine;
      for (int t = id; t < threads; t += n) {
        adapterserve::lora_spans(call, plan, t, mine);
        spans.insert(spans.end(), mine.begin(), mine.end());
      }
      int64_t bytes = 0;
      for (size_t i = 1; i < spans.size(); i += 2) bytes += spans[i];
      const int64_t blocks = isa == 2 ? (M + 7) / 8 : 2 * ((M + 3) / 4);  // (the tiles' passes over groups)
      const int64_t steps = (t1 - t0) * G * blocks;
      // over the second half of the tiles: lines fetched earlier were more often evicted by the
      // base's own weights before the deltas read them (16 distinct adapters: -0.5 ms a step)
      const int64_t rate = (2 * bytes / steps + 63) / 64 * 64;
      pf = {spans.data(), static_cast<int64_t>(spans.size()) / 2, 0, 0, rate, steps / 2};
    }
    if (t0 < t1) {
      if (isa == 2 && bits == 4)
        tiles_avx512<4>(q, dx, dsum, M, K, N, w, sm, bias, y, acc, t0, t1, pf);
      else if (isa == 2)
        tiles_avx512<8>(q, dx, dsum, M, K, N, w, sm, bias, y, acc, t0, t1, pf);
      else if (bits == 4)
        tiles_avx2<4>(q, dx, dsum, M, K, N, w, sm, bias, y, acc, t0, t1, pf);
      else
        tiles_avx2<8>(q, dx, dsum, M, K, N, w, sm, bias, y, acc, t0, t1, pf);
    }
    if (lora != nullptr) {
#pragma omp barrier
      for (int t = id; t < threads; t += n) adapterserve::lora_run(call, plan, t);
    }
  }
}

}  // extern "C"
