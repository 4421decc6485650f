// Python bindings of the CPU kernels; the argument conventions are those of
// metrix_kernels/backends/__init__.py, adapted by metrix_kernels/backends/cpu.py.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pairwise_forward", &metrix::pairwise_forward);
  m.def("pairwise_backward", &metrix::pairwise_backward);
  m.def("gram_mixed_forward", &metrix::gram_mixed_forward);
  m.def("gram_mixed_backward", &metrix::gram_mixed_backward);
  m.def("mixpool_forward", &metrix::mixpool_forward);
  m.def("mixpool_backward", &metrix::mixpool_backward);
  m.def("unit_rows_forward", &metrix::unit_rows_forward);
  m.def("unit_rows_backward", &metrix::unit_rows_backward);
  m.def("assemble_forward", &metrix::assemble_forward);
  m.def("assemble_backward", &metrix::assemble_backward);
}
