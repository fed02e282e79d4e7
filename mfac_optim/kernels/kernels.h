// The functions the compiled library registers as torch operators (bindings.cpp); their documentation is beside their
// definitions.
#pragma once
// ATen's tensor and the per-operator headers the sources call, not torch/types.h (all of ATen) nor
// torch/extension.h (with pybind11): the build's time is mostly the headers', and it is paid at a user's first step.
#include <ATen/core/Tensor.h>

// cpu_passes.cpp: the window passes.
at::Tensor window_dots(at::Tensor window, int64_t slot);
void window_combine(at::Tensor window, at::Tensor coefficients, at::Tensor result);
at::Tensor sparse_dots(at::Tensor indices, at::Tensor values, at::Tensor dense);
void sparse_combine(at::Tensor indices, at::Tensor values, at::Tensor coefficients, at::Tensor result);
void compressed_select(at::Tensor error, at::Tensor values, at::Tensor offsets, int64_t slot, int64_t block,
                       int64_t last_kept, int64_t size);
at::Tensor compressed_dots(at::Tensor values, at::Tensor offsets, int64_t slot, int64_t block, int64_t filled);
void compressed_combine(at::Tensor values, at::Tensor offsets, at::Tensor coefficients, at::Tensor result,
                        int64_t block, int64_t filled);

// factor_update.cpp: the O(m²) update of the m × m Cholesky factor.
void factor_drop_oldest_append_newest(at::Tensor factor, at::Tensor column, double diagonal, int64_t filled);
