// pybind11 bindings of the C++ CPU kernels. Tensors cross as data pointers (integers);
// the Python wrapper (ipa_fast/cpu_backend.py) owns validation and allocation.
#include <pybind11/pybind11.h>

#include "philox.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "ipa_fast C++ CPU kernels";
  m.def("philox_uniform", &ipa_fast::philox_uniform, py::arg("seed"), py::arg("offset"),
        "The row uniform of the sampler's RNG stream for (seed, offset), as uint64 bit patterns.");
}
