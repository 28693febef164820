// Each row's LoRA deltas of a group (lora.cpp), as q4_linear adds them after the base's product
// in the same call and as lora_rows adds them alone. Internal to the kernel library.
#pragma once
#include <stdint.h>

#include <cmath>
#include <vector>

namespace adapterserve {

constexpr int LORA_ENTRY = 5;  // int64s per row and part of a table (app/kernels/lora_table.py)
constexpr int MAX_RANK = 256;  // (padded ranks; app/kernels/lora_table.py refuses more)

// One call's rows and the table of where their adapters' weights are
struct LoraCall {
  int isa;             // 2: AVX-512 VNNI, 1: AVX2
  int64_t M, P, K;     // rows, parts, inputs
  const float* x;      // the rows [M, K] (float32 weights read these)
  const int8_t* qx;    // the rows in 8 bits per group of 32 [M, K] (8-bit weights read these)
  const float* dx;     // their scales [M, K / 32]
  const int32_t* sx;   // the sums of each group's 8-bit values [M, K / 32]
  float* y;            // outputs [M, ldy]: part p's at offsets[p] :+ outs[p]
  int64_t ldy;
  const int64_t* table;
  const float* scales;
  const int64_t* offsets;
  const int64_t* outs;
};

// x [M, K] -> 8 bits per group of 32 (q4.cpp: the base's own rounding): qx, dx, dx * sum(qx) and
// sum(qx) (isum, when not null)
void quantize_x(int isa, const float* x, int64_t M, int64_t K, int8_t* qx, float* dx, float* dsum,
                int32_t* isum);
// The call's tasks: (part, first row, rows) for each run of rows of one adapter and each part
// with a delta, and the thread that runs each (threads: the team's size; balanced by weights read)
void lora_plan(const LoraCall& c, int threads, std::vector<int64_t>& tasks);
// The bytes the tasks of thread `id` read: (address, bytes) pairs appended to spans
void lora_spans(const LoraCall& c, const std::vector<int64_t>& tasks, int id, std::vector<int64_t>& spans);
// Run thread `id`'s tasks
void lora_run(const LoraCall& c, const std::vector<int64_t>& tasks, int id);

// t [n][rank] -> 8 bits per row: qt, its scale and the sum of its values (RNE, as cvtps rounds)
inline void round_t(const float* t, int64_t rank, int8_t* qt, float* st, int32_t* sum) {
  float amax = 0.f;
  for (int64_t j = 0; j < rank; ++j) amax = std::fmax(amax, std::fabs(t[j]));
  *st = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t s = 0;
  for (int64_t j = 0; j < rank; ++j) {
    const float v = std::fmin(127.f, std::fmax(-127.f, std::nearbyint(t[j] * inv)));
    qt[j] = static_cast<int8_t>(v);
    s += qt[j];
  }
  *sum = s;
}

// Prefetches spans into L2, `per` bytes at each step (a group of a tile of the base's product)
// after the first `wait` steps
struct Prefetcher {
  const int64_t* spans = nullptr;
  int64_t count = 0, i = 0, off = 0, per = 0, wait = 0;
  void step();
};

}  // namespace adapterserve
