// The sampler's rules, shared by the C++ CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda):
// the dtype codes that cross pybind11, the accepted per-row parameter values (the kernel form of
// ipa_fast.reference.RANGES: the Python wrapper turns an out-of-range value into that range's
// invalid marker, which these rules reject) and the token of an invalid row. Host and device
// code; no torch headers. tests/test_rules_header.py checks every constexpr here against the
// Python definitions (ipa_fast/reference.py, the backends' dtype maps), so the two cannot drift.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define IPA_RULES_HD __host__ __device__ __forceinline__
#else
#define IPA_RULES_HD inline
#endif

namespace ipa_fast {

// dtype codes of the logits tensors (ipa_fast/cpu_backend.py and cuda_backend.py map torch
// dtypes to these).
constexpr int kFloat32 = 0;
constexpr int kFloat16 = 1;
constexpr int kBFloat16 = 2;

// Per-row parameters. temperature >= kTemperatureMin, which is also the greedy value; a greedy
// row's logprobs are those at kGreedyLogprobTemperature.
constexpr float kTemperatureMin = 0.0f;
constexpr float kGreedyLogprobTemperature = 1.0f;
// top_k >= kTopKMin, which is also "off" (as is any k >= V).
constexpr int64_t kTopKMin = 0;
// kTopPMin < top_p <= kTopPMax; kTopPMax is also "off".
constexpr float kTopPMin = 0.0f;
constexpr float kTopPMax = 1.0f;
// kMinPMin <= min_p <= kMinPMax; kMinPMin is also "off".
constexpr float kMinPMin = 0.0f;
constexpr float kMinPMax = 1.0f;

// An invalid row (bad logits or parameters) comes back as this token, NaN logprobs, valid false.
constexpr int64_t kInvalidToken = 0;

// Whether a row's parameters are accepted. Written so that NaN parameters fail: comparisons
// with NaN are false.
IPA_RULES_HD bool params_ok(float temperature, int64_t top_k, float top_p, float min_p) {
  return temperature >= kTemperatureMin && top_k >= kTopKMin && top_p > kTopPMin && top_p <= kTopPMax &&
         min_p >= kMinPMin && min_p <= kMinPMax;
}

IPA_RULES_HD bool is_greedy(float temperature) { return temperature == kTemperatureMin; }
IPA_RULES_HD bool top_k_on(int64_t top_k, int64_t vocab) { return top_k > kTopKMin && top_k < vocab; }
IPA_RULES_HD bool top_p_on(float top_p) { return top_p < kTopPMax; }
IPA_RULES_HD bool min_p_on(float min_p) { return min_p > kMinPMin; }

}  // namespace ipa_fast
