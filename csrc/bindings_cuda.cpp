// pybind11 bindings of the CUDA kernels. Tensors cross as data pointers and the stream as an
// integer; the Python wrapper (ipa_fast/cuda_backend.py) owns validation and allocation.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "cuda/sampler.h"
#include "philox.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ipa_fast CUDA kernels";
  m.def(
      "sample",
      [](int dtype, int64_t batch, int64_t vocab, uintptr_t base, uintptr_t adapter, uintptr_t alpha,
         uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t offset,
         uintptr_t tokens, uintptr_t logprobs, uintptr_t filtered_logprobs, uintptr_t valid, uintptr_t stream,
         uintptr_t workspace_f32, uintptr_t workspace_i32) {
        ipa_fast::cuda::SampleArgs a{dtype,  batch,  vocab,    base,     adapter,           alpha,
                                     temperature, top_p, min_p, top_k, seed, offset, tokens, logprobs,
                                     filtered_logprobs, valid, stream, workspace_f32, workspace_i32};
        const char* err = ipa_fast::cuda::launch_sample(a);
        if (err != nullptr) throw std::runtime_error(err);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("vocab"), py::arg("base"), py::arg("adapter"), py::arg("alpha"),
      py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("seed"),
      py::arg("offset"), py::arg("tokens"), py::arg("logprobs"), py::arg("filtered_logprobs"), py::arg("valid"),
      py::arg("stream"), py::arg("workspace_f32"), py::arg("workspace_i32"),
      "Enqueue the fused sampler on `stream` (pointers as integers; no synchronisation).");
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
