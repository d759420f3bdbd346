// The fused tailored sampler, C++ CPU kernel: mix of K experts -> top-k / top-p / min-p -> one
// draw -> log-probs, for every row of K [B, V] logits tensors. Framework-free (no torch headers):
// pointers and dtype codes come from csrc/bindings_cpu.cpp. Semantics: ipa_fast/reference.py.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "rules.h"  // dtype codes (kFloat32, kFloat16, kBFloat16) and parameter rules

namespace ipa_fast {
namespace cpu {

// A row's vocabulary is cut into fixed chunks (reductions are merged in chunk order, so a
// row's result depends only on V, never on B or on the number of threads) and into blocks
// whose maxima bound the top-k threshold from below.
constexpr int64_t kChunk = 2048;
constexpr int64_t kBlock = 256;

struct SamplerArgs {
  // K >= 1 experts: expert k's row r starts at experts[k] + r * expert_strides[k] elements of
  // dtype expert_dtypes[k]; its columns are adjacent.
  int num_experts = 0;
  const void* const* experts = nullptr;
  const int* expert_dtypes = nullptr;
  const int64_t* expert_strides = nullptr;
  // Expert k's weight in row r: weights[r * weight_stride + k - unit_first], and 1 for k = 0
  // when unit_first is 1 (how sample(base, adapter, alpha) passes alpha as a [B] tensor).
  // z = sum_k w_k * l_k in float32, left to right; w_k == 0 skips expert k (ipa_fast/reference.py).
  const float* weights = nullptr;
  int64_t weight_stride = 0;
  int unit_first = 0;
  int64_t batch = 0;
  int64_t vocab = 0;
  // per-row parameters, each [B]
  const float* temperature = nullptr;
  const int64_t* top_k = nullptr;
  const float* top_p = nullptr;
  const float* min_p = nullptr;
  const int64_t* seed = nullptr;    // read as uint64
  const int64_t* offset = nullptr;  // read as uint64
  // outputs, each [B]
  int64_t* tokens = nullptr;
  float* logprobs = nullptr;
  float* filtered_logprobs = nullptr;
  bool* valid = nullptr;
};

// Samples every row. num_threads >= 1 OpenMP threads: over rows, or inside a row when B is
// smaller than the thread count. Never throws; bad rows come back with valid = false.
void sample(const SamplerArgs& args, int num_threads);

// The memory floor: one plain read of both inputs (a sum, so the loads are not optimised
// away), parallelised like the sampler. adapter may be null.
double read_pass(const void* base, int base_dtype, const void* adapter, int adapter_dtype, int64_t batch,
                 int64_t vocab, int num_threads);

// exp(x) for x <= 0 as the kernel computes it (0 below -87); exposed for tests.
float exp_nonpositive(float x);

// The builds of the row code: "scalar" (portable) and, on x86 with GCC / Clang, "avx2" (AVX2 +
// FMA + F16C, compiled through function targets, so a portable build carries it too). Both give
// the same results. isas(): the builds this CPU runs, "scalar" first; isa(): the one sample and
// read_pass use, the fastest at load; set_isa(name) switches (tests, benchmarks) and returns
// false, changing nothing, for a build that is not in isas().
std::vector<std::string> isas();
std::string isa();
bool set_isa(const std::string& name);

}  // namespace cpu
}  // namespace ipa_fast
