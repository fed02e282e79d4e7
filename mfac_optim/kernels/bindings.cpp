// The kernels as torch operators, torch.ops.<module name>.<function> (loaded by mfac_optim/kernels/__init__.py).
// A registration library rather than a Python module: torch/library.h compiles in a fraction of pybind11's time.
// The schemas mark the tensors a kernel writes in place (Tensor(a!)).
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  // G g in float64, g = row `slot` of the dense window
  m.def("window_dots(Tensor window, int slot) -> Tensor", &window_dots);
  // result = G^T c in fp32
  m.def("window_combine(Tensor window, Tensor coefficients, Tensor(a!) result) -> ()", &window_combine);
  // dots of every row-sparse slot with a dense matrix, in float64
  m.def("sparse_dots(Tensor indices, Tensor values, Tensor dense) -> Tensor", &sparse_dots);
  // result = sum_j c_j * (row-sparse slot j scattered), in fp32
  m.def("sparse_combine(Tensor indices, Tensor values, Tensor coefficients, Tensor(a!) result) -> ()",
        &sparse_combine);
  // top-k per block of the error buffer (after the error feedback) into slot `slot`; the error keeps the rest
  m.def("compressed_select(Tensor(a!) error, Tensor(b!) values, Tensor(c!) offsets, int slot, int block, "
        "int last_kept, int size) -> ()", &compressed_select);
  // dots of the first `filled` compressed slots with slot `slot`, in float64
  m.def("compressed_dots(Tensor values, Tensor offsets, int slot, int block, int filled) -> Tensor", &compressed_dots);
  // result = sum_j c_j * compressed slot j over the first `filled` slots, in fp32
  m.def("compressed_combine(Tensor values, Tensor offsets, Tensor coefficients, Tensor(a!) result, int block, "
        "int filled) -> ()",
        &compressed_combine);
  // in place: the upper Cholesky factor without its first row and column, plus a last one for `column`
  m.def("factor_drop_oldest_append_newest(Tensor(a!) factor, Tensor column, float diagonal, int filled) -> ()",
        &factor_drop_oldest_append_newest);
}
