// The Python module torch's extension builder makes of the kernels (loaded by mfac_optim/kernels/__init__.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("window_dots", &window_dots, "G g in float64, g = row `slot` of the dense window");
  m.def("window_combine", &window_combine, "result = G^T c in fp32");
  m.def("sparse_dots", &sparse_dots, "dots of every row-sparse slot with a dense matrix, in float64");
  m.def("sparse_combine", &sparse_combine, "result = sum_j c_j * (row-sparse slot j scattered), in fp32");
  m.def("compressed_store", &compressed_store, "error feedback and top-k per block into slot `slot`");
  m.def("compressed_dots", &compressed_dots, "dots of every compressed slot with slot `slot`, in float64");
  m.def("compressed_combine", &compressed_combine, "result = sum_j c_j * compressed slot j, in fp32");
  m.def("factor_drop_oldest_append_newest", &factor_drop_oldest_append_newest,
        "in place: the upper Cholesky factor without its first row and column, plus a last one for `column`");
}
