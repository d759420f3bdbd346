// Host-side entry point of the CUDA sampler. No CUDA or torch headers: tensors arrive as data
// pointers and the stream as an integer, so the pybind11 binding compiles with the host compiler.
#pragma once
#include <cstdint>

#include "rules.h"  // dtype codes (kFloat32, kFloat16, kBFloat16) and parameter rules

namespace ipa_fast {
namespace cuda {

// Experts a launch reads in place (more are folded by the Python wrapper first).
constexpr int kMaxExperts = 8;

struct SampleArgs {
  int dtype;              // of every expert (the wrapper casts mixed dtypes to float32)
  int64_t batch, vocab;
  // K experts: expert k's row r starts at experts[k] + r * expert_strides[k] elements. Its weight
  // in row r is weights[r * weight_stride + k - unit_first] (1 for k = 0 when unit_first is 1).
  // z = sum_k w_k * l_k in float32, left to right; w_k == 0 skips expert k (ipa_fast/reference.py).
  int num_experts;
  uintptr_t experts[kMaxExperts];
  int64_t expert_strides[kMaxExperts];
  uintptr_t weights;  // float32
  int64_t weight_stride;
  int unit_first;
  uintptr_t temperature, top_p, min_p;         // [B] float32
  uintptr_t top_k, seed, offset;               // [B] int64 (seed and offset read as uint64)
  uintptr_t tokens;                            // [B] int64 out
  uintptr_t logprobs, filtered_logprobs;       // [B] float32 out
  uintptr_t valid;                             // [B] bool (1 byte) out
  uintptr_t stream;                            // cudaStream_t
  uintptr_t workspace_f32, workspace_i32;      // scratch of workspace_size() elements each
};

// Elements of float32 and int32 scratch the sampler needs for [batch, vocab] (about 128 KiB a row).
void workspace_size(int64_t batch, int64_t vocab, int64_t* n_f32, int64_t* n_i32);

// Enqueues the sampler on args.stream; never synchronises. Returns nullptr, or a static error text.
const char* launch_sample(const SampleArgs& args);

}  // namespace cuda
}  // namespace ipa_fast
