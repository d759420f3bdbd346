// pybind11 bindings of the CUDA kernels. Tensors cross as data pointers and the stream as an
// integer; the Python wrapper (ipa_fast/cuda_backend.py) owns validation and allocation.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "cuda/sampler.h"
#include "philox.h"

namespace py = pybind11;

namespace {

void fill(ipa_fast::cuda::SampleArgs& a, uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p,
          uintptr_t seed, uintptr_t offset, uintptr_t tokens, uintptr_t logprobs, uintptr_t filtered_logprobs,
          uintptr_t valid, uintptr_t stream, uintptr_t workspace_f32, uintptr_t workspace_i32) {
  a.temperature = temperature;
  a.top_k = top_k;
  a.top_p = top_p;
  a.min_p = min_p;
  a.seed = seed;
  a.offset = offset;
  a.tokens = tokens;
  a.logprobs = logprobs;
  a.filtered_logprobs = filtered_logprobs;
  a.valid = valid;
  a.stream = stream;
  a.workspace_f32 = workspace_f32;
  a.workspace_i32 = workspace_i32;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ipa_fast CUDA kernels";
  // _sample / _sample_experts are private (underscore): the public entry is the registered op
  // torch.ops.ipa_fast.sample_experts, whose Python wrapper checks every argument.
  m.def(
      "_sample",
      [](int dtype, int64_t batch, int64_t vocab, uintptr_t base, int64_t base_stride, uintptr_t adapter,
         int64_t adapter_stride, uintptr_t alpha,
         uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t offset,
         uintptr_t tokens, uintptr_t logprobs, uintptr_t filtered_logprobs, uintptr_t valid, uintptr_t stream,
         uintptr_t workspace_f32, uintptr_t workspace_i32) {
        // the two-expert form: base (weight 1) and an optional adapter (weight alpha[r]); row strides in
        // elements (columns adjacent)
        ipa_fast::cuda::SampleArgs a{};
        a.dtype = dtype;
        a.batch = batch;
        a.vocab = vocab;
        a.num_experts = adapter ? 2 : 1;
        a.experts[0] = base;
        a.experts[1] = adapter;
        a.expert_strides[0] = base_stride;
        a.expert_strides[1] = adapter_stride;
        a.weights = alpha;
        a.weight_stride = 1;
        a.unit_first = 1;
        fill(a, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs, filtered_logprobs, valid, stream,
             workspace_f32, workspace_i32);
        const char* err = ipa_fast::cuda::launch_sample(a);
        if (err != nullptr) throw std::runtime_error(err);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("vocab"), py::arg("base"), py::arg("base_stride"),
      py::arg("adapter"), py::arg("adapter_stride"), py::arg("alpha"),
      py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("seed"),
      py::arg("offset"), py::arg("tokens"), py::arg("logprobs"), py::arg("filtered_logprobs"), py::arg("valid"),
      py::arg("stream"), py::arg("workspace_f32"), py::arg("workspace_i32"),
      "Enqueue the fused sampler on `stream` (pointers as integers; no synchronisation).");
  m.def(
      "_sample_experts",
      [](int dtype, int64_t batch, int64_t vocab, const std::vector<uintptr_t>& experts,
         const std::vector<int64_t>& strides, uintptr_t weights, int64_t weight_stride, uintptr_t temperature,
         uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t offset, uintptr_t tokens,
         uintptr_t logprobs, uintptr_t filtered_logprobs, uintptr_t valid, uintptr_t stream, uintptr_t workspace_f32,
         uintptr_t workspace_i32) {
        if (experts.empty() || experts.size() > static_cast<size_t>(ipa_fast::cuda::kMaxExperts) ||
            strides.size() != experts.size())
          throw std::invalid_argument("sample_experts: 1 to kMaxExperts experts, one row stride each");
        ipa_fast::cuda::SampleArgs a{};
        a.dtype = dtype;
        a.batch = batch;
        a.vocab = vocab;
        a.num_experts = static_cast<int>(experts.size());
        for (size_t k = 0; k < experts.size(); ++k) {
          a.experts[k] = experts[k];
          a.expert_strides[k] = strides[k];
        }
        a.weights = weights;
        a.weight_stride = weight_stride;
        a.unit_first = 0;
        fill(a, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs, filtered_logprobs, valid, stream,
             workspace_f32, workspace_i32);
        const char* err = ipa_fast::cuda::launch_sample(a);
        if (err != nullptr) throw std::runtime_error(err);
      },
      "Enqueue the K-expert sampler (K <= kMaxExperts pointers with row strides; weights [B, weight_stride]).");
  m.attr("kMaxExperts") = ipa_fast::cuda::kMaxExperts;
  m.def(
      "workspace_size",
      [](int64_t batch, int64_t vocab) {
        int64_t n_f32, n_i32;
        ipa_fast::cuda::workspace_size(batch, vocab, &n_f32, &n_i32);
        return py::make_tuple(n_f32, n_i32);
      },
      py::arg("batch"), py::arg("vocab"), "(float32 elements, int32 elements) of scratch for sample().");
  m.def("philox_uniform", &ipa_fast::philox_uniform, py::arg("seed"), py::arg("offset"),
        "The row uniform of the sampler's RNG stream (host copy of the device function).");
}
