// pybind11 bindings of the C++ CPU kernels. Tensors cross as data pointers (integers);
// the Python wrapper (ipa_fast/cpu_backend.py) owns validation and allocation.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include <cstdint>

#include "cpu/sampler.h"
#include "philox.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void fill_params(ipa_fast::cpu::SamplerArgs& a, int64_t batch, int64_t vocab, std::uintptr_t temperature,
                 std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t min_p, std::uintptr_t seed,
                 std::uintptr_t offset, std::uintptr_t tokens, std::uintptr_t logprobs,
                 std::uintptr_t filtered_logprobs, std::uintptr_t valid) {
  a.batch = batch;
  a.vocab = vocab;
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
}

// Per-expert data pointers, dtype codes and row strides (elements: a [:, :V] slice of a wider
// tensor is read in place); weights [B, weight_stride] float32, and unit_first 1 for the two-expert
// form sample(base, adapter, alpha) with alpha as a [B] column (see SamplerArgs).
void sample_experts_cpu(const std::vector<std::uintptr_t>& experts, const std::vector<int>& dtypes,
                        const std::vector<int64_t>& strides, std::uintptr_t weights, int64_t weight_stride,
                        int unit_first, int64_t batch, int64_t vocab, std::uintptr_t temperature,
                        std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t min_p, std::uintptr_t seed,
                        std::uintptr_t offset, std::uintptr_t tokens, std::uintptr_t logprobs,
                        std::uintptr_t filtered_logprobs, std::uintptr_t valid, int num_threads) {
  if (experts.empty() || dtypes.size() != experts.size() || strides.size() != experts.size())
    throw std::invalid_argument("sample_experts: experts, dtypes and strides must be K >= 1 entries each");
  std::vector<const void*> ptrs(experts.size());
  for (size_t k = 0; k < experts.size(); ++k) ptrs[k] = ptr<const void>(experts[k]);
  ipa_fast::cpu::SamplerArgs a;
  a.num_experts = static_cast<int>(experts.size());
  a.experts = ptrs.data();
  a.expert_dtypes = dtypes.data();
  a.expert_strides = strides.data();
  a.weights = ptr<const float>(weights);
  a.weight_stride = weight_stride;
  a.unit_first = unit_first;
  fill_params(a, batch, vocab, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs, filtered_logprobs,
              valid);
  py::gil_scoped_release release;
  ipa_fast::cpu::sample(a, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ipa_fast C++ CPU kernels";
  m.def("philox_uniform", &ipa_fast::philox_uniform, py::arg("seed"), py::arg("offset"),
        "The row uniform of the sampler's RNG stream for (seed, offset), as uint64 bit patterns.");
  // Private (underscore): the public entry is the registered op torch.ops.ipa_fast.sample_experts,
  // whose Python wrapper checks every argument; this trusts pointers, dtypes and row strides.
  m.def("_sample_experts", &sample_experts_cpu,
        "The fused sampler over K experts' [B, V] logits given as data pointers (see csrc/cpu/sampler.h).");
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
  // Private: which build of the CPU kernel runs ("scalar" or "avx2", chosen at load from the
  // CPU's features); _set_isa switches it for tests and benchmarks and returns the previous one.
  m.def("_isas", &ipa_fast::cpu::isas, "The builds of the CPU kernel this CPU runs, 'scalar' first.");
  m.def("_isa", &ipa_fast::cpu::isa, "The build of the CPU kernel in use.");
  m.def(
      "_set_isa",
      [](const std::string& name) {
        std::string previous = ipa_fast::cpu::isa();
        if (!ipa_fast::cpu::set_isa(name)) {
          std::string known;
          for (const std::string& n : ipa_fast::cpu::isas()) known += (known.empty() ? "" : ", ") + n;
          throw std::invalid_argument("_set_isa: '" + name + "' is not a build this CPU runs (" + known + ")");
        }
        return previous;
      },
      py::arg("name"), "Use the build 'scalar' or 'avx2' of the CPU kernel; returns the previous one.");
}
