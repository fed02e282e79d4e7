// The functions the compiled module exports (bindings.cpp); their documentation is beside their definitions.
#pragma once
// torch's tensor types alone: the Python bindings' headers, which double a file's compile time, are bindings.cpp's.
#include <torch/types.h>

// cpu_passes.cpp: the window passes.
torch::Tensor window_dots(torch::Tensor window, int64_t slot);
void window_combine(torch::Tensor window, torch::Tensor coefficients, torch::Tensor result);
torch::Tensor sparse_dots(torch::Tensor indices, torch::Tensor values, torch::Tensor dense);
void sparse_combine(torch::Tensor indices, torch::Tensor values, torch::Tensor coefficients, torch::Tensor result);
void compressed_store(torch::Tensor error, torch::Tensor grad, torch::Tensor values, torch::Tensor offsets,
                      int64_t slot, int64_t block, int64_t last_kept);
torch::Tensor compressed_dots(torch::Tensor values, torch::Tensor offsets, int64_t slot, int64_t block);
void compressed_combine(torch::Tensor values, torch::Tensor offsets, torch::Tensor coefficients, torch::Tensor result,
                        int64_t block);

// factor_update.cpp: the O(m²) update of the m × m Cholesky factor.
void factor_drop_oldest_append_newest(torch::Tensor factor, torch::Tensor column, double diagonal);
