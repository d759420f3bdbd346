// pybind11 bindings of the C++ CPU kernels. Tensors cross as data pointers (integers);
// the Python wrapper (ipa_fast/cpu_backend.py) owns validation and allocation.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/sampler.h"
#include "philox.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void sample_cpu(std::uintptr_t base, int base_dtype, std::uintptr_t adapter, int adapter_dtype, int64_t batch,
                int64_t vocab, std::uintptr_t alpha, std::uintptr_t temperature, std::uintptr_t top_k,
                std::uintptr_t top_p, std::uintptr_t min_p, std::uintptr_t seed, std::uintptr_t offset,
                std::uintptr_t tokens, std::uintptr_t logprobs, std::uintptr_t filtered_logprobs,
                std::uintptr_t valid, int num_threads) {
  ipa_fast::cpu::SamplerArgs a;
  a.base = ptr<const void>(base);
  a.base_dtype = base_dtype;
  a.adapter = ptr<const void>(adapter);
  a.adapter_dtype = adapter_dtype;
  a.batch = batch;
  a.vocab = vocab;
  a.alpha = ptr<const float>(alpha);
  a.temperature = ptr<const float>(temperature);
  a.top_k = ptr<const int64_t>(top_k);
  a.top_p = ptr<const float>(top_p);
  a.min_p = ptr<const float>(min_p);
  a.seed = ptr<const int64_t>(seed);
  a.offset = ptr<const int64_t>(offset);
  a.tokens = ptr<int64_t>(tokens);
  a.logprobs = ptr<float>(logprobs);
  a.filtered_logprobs = ptr<float>(filtered_logprobs);
  a.valid = ptr<bool>(valid);
  ipa_fast::cpu::sample(a, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ipa_fast C++ CPU kernels";
  m.def("philox_uniform", &ipa_fast::philox_uniform, py::arg("seed"), py::arg("offset"),
        "The row uniform of the sampler's RNG stream for (seed, offset), as uint64 bit patterns.");
  m.def("sample", &sample_cpu, py::call_guard<py::gil_scoped_release>(),
        "The fused sampler over [B, V] logits given as data pointers (see csrc/cpu/sampler.h).");
  m.def(
      "read_pass",
      [](std::uintptr_t base, int base_dtype, std::uintptr_t adapter, int adapter_dtype, int64_t batch, int64_t vocab,
         int num_threads) {
        return ipa_fast::cpu::read_pass(ptr<const void>(base), base_dtype, ptr<const void>(adapter), adapter_dtype,
                                        batch, vocab, num_threads);
      },
      py::call_guard<py::gil_scoped_release>(), "One plain read of both inputs (the memory floor); returns their sum.");
  m.def("exp_nonpositive", &ipa_fast::cpu::exp_nonpositive, py::arg("x"),
        "exp(x) for x <= 0 as the kernel computes it (0 below -87).");
  m.attr("kChunk") = ipa_fast::cpu::kChunk;
}
