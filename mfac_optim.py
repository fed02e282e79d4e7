"""M-FAC: matrix-free inverse empirical Fisher preconditioning (Frantar, Kurtic, Alistarh, NeurIPS 2021).

Notation (as in ../shared/DESIGN.md): d parameters, a window G (m × d) of the last m gradients (empty slots are
zero rows), damp λ > 0, and the dampened empirical Fisher F = λI + (1/m) GᵀG. Each step stores the new gradient g
as row i of G and moves the parameters along u = F⁻¹g.

Because g is itself row i of G, Woodbury gives u = m · Gᵀ K⁻¹ eᵢ with K = mλI + GGᵀ (m × m). Unlike the reference
form g/λ − Gᵀ(…)/λ, this subtracts no two huge vectors, so it keeps its digits for tiny λ. Per step: one pass over
the window for the dot products s = G g (which also refresh row and column i of the Gram matrix S = GGᵀ, kept in
float64), one float64 Cholesky solve of the m × m system, and one pass for the combination Gᵀ y.

`GradientWindow` is the arithmetic on flat vectors; `MFAC` is the torch.optim plumbing around it.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# State entries that count steps or say which shard this is: kept on the CPU, as torch.optim keeps "step".
COUNTERS = ("step", "skipped_steps", "shard_rank", "shard_world_size")

# Hyperparameters that define the one shared window, so every param group must agree on them.
WINDOW_KEYS = ("num_grads", "damp", "grad_dtype", "shard")

# Columns per block in the window passes: partial sums of one block are accumulated in fp32 and the blocks are
# summed in float64, which bounds the rounding error by the block length rather than by d.
BLOCK_COLUMNS = 1 << 16


# The two window passes on the CPU, fused: each bf16 element is widened to fp32 in registers and consumed at once,
# so the window is read exactly once per pass and no fp32 copy of it exists. Column blocks go to threads; within a
# block every row's segment is streamed, with per-block fp32 partial sums added up in float64.
CPU_KERNELS = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float widen(float x) { return x; }
static inline float widen(uint16_t x) { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
#ifdef __AVX2__
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

constexpr int64_t kBlock = 8192;  // columns per block: 16-32 KiB row segments keep the prefetchers streaming

// Rows are taken R at a time so that each load of v (dots) or of the output block (combine) serves R rows.
constexpr int R = 4;

// ⟨a, b⟩ over `count` elements, each side bf16 or fp32, accumulated in fp32.
template <typename A, typename B>
static float dot(const A* a, const B* b, int64_t count) {
  int64_t k = 0;
  float total = 0.f;
#ifdef __AVX2__
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= count; k += 16) {
    a0 = _mm256_fmadd_ps(load8(a + k), load8(b + k), a0);
    a1 = _mm256_fmadd_ps(load8(a + k + 8), load8(b + k + 8), a1);
  }
  total = horizontal_sum(_mm256_add_ps(a0, a1));
#endif
  for (; k < count; ++k) total += widen(a[k]) * widen(b[k]);
  return total;
}

// out[k] += a · row[k].
template <typename T>
static void axpy(float a, const T* row, float* out, int64_t count) {
  int64_t k = 0;
#ifdef __AVX2__
  const __m256 scale = _mm256_set1_ps(a);
  for (; k + 8 <= count; k += 8)
    _mm256_storeu_ps(out + k, _mm256_fmadd_ps(scale, load8(row + k), _mm256_loadu_ps(out + k)));
#endif
  for (; k < count; ++k) out[k] += a * widen(row[k]);
}

#ifdef __AVX2__
template <typename T>
static void dots_four_rows(const T* const* rows, const T* v, int64_t count, double* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    const __m256 x = load8(v + k);
    a0 = _mm256_fmadd_ps(load8(rows[0] + k), x, a0);
    a1 = _mm256_fmadd_ps(load8(rows[1] + k), x, a1);
    a2 = _mm256_fmadd_ps(load8(rows[2] + k), x, a2);
    a3 = _mm256_fmadd_ps(load8(rows[3] + k), x, a3);
  }
  float totals[4] = {horizontal_sum(a0), horizontal_sum(a1), horizontal_sum(a2), horizontal_sum(a3)};
  for (; k < count; ++k)
    for (int r = 0; r < 4; ++r) totals[r] += widen(rows[r][k]) * widen(v[k]);
  for (int r = 0; r < 4; ++r) out[r] += totals[r];
}
#endif

template <typename T>
static void axpy_rows(const float* a, const T* const* rows, int count_rows, float* out, int64_t count) {
  int64_t k = 0;
#ifdef __AVX2__
  if (count_rows == 4) {
    const __m256 s0 = _mm256_set1_ps(a[0]), s1 = _mm256_set1_ps(a[1]), s2 = _mm256_set1_ps(a[2]), s3 = _mm256_set1_ps(a[3]);
    for (; k + 8 <= count; k += 8) {
      __m256 acc = _mm256_loadu_ps(out + k);
      acc = _mm256_fmadd_ps(s0, load8(rows[0] + k), acc);
      acc = _mm256_fmadd_ps(s1, load8(rows[1] + k), acc);
      acc = _mm256_fmadd_ps(s2, load8(rows[2] + k), acc);
      acc = _mm256_fmadd_ps(s3, load8(rows[3] + k), acc);
      _mm256_storeu_ps(out + k, acc);
    }
  }
#endif
  for (int r = 0; r < count_rows; ++r) axpy(a[r], rows[r] + k, out + k, count - k);
}

// Calls visit(first column, column count, first row, row pointers, row count) for every tile of a column block
// and up to R rows; column blocks are split over threads, and one thread visits a block's rows in order.
template <typename T, typename Visit>
static void for_each_tile(const torch::Tensor& window, Visit visit) {
  const int64_t m = window.size(0), n = window.size(1), blocks = (n + kBlock - 1) / kBlock;
  const T* w = reinterpret_cast<const T*>(window.data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t k0 = b * kBlock, count = std::min(n, k0 + kBlock) - k0;
      for (int64_t j = 0; j < m; j += R) {
        const int rows_here = static_cast<int>(std::min<int64_t>(R, m - j));
        const T* rows[R];
        for (int r = 0; r < rows_here; ++r) rows[r] = w + (j + r) * n + k0;
        visit(k0, count, j, rows, rows_here);
      }
    }
  });
}

// G g for g = row `slot` of the window itself (the stored gradient).
template <typename T>
static torch::Tensor dots_impl(const torch::Tensor& window, int64_t slot) {
  const int64_t m = window.size(0);
  const T* v = reinterpret_cast<const T*>(window.data_ptr()) + slot * window.size(1);
  auto partial = torch::zeros({at::get_num_threads(), m}, torch::kFloat64);
  double* p = partial.data_ptr<double>();
  for_each_tile<T>(window, [&](int64_t k0, int64_t count, int64_t j, const T* const* rows, int rows_here) {
    double* mine = p + at::get_thread_num() * m + j;
#ifdef __AVX2__
    if (rows_here == 4) return dots_four_rows(rows, v + k0, count, mine);
#endif
    for (int r = 0; r < rows_here; ++r) mine[r] += dot(rows[r], v + k0, count);
  });
  return partial.sum(0);
}

// Gᵀ c into `result` (reused across steps: a fresh buffer of this size costs page faults every step).
template <typename T>
static void combine_impl(const torch::Tensor& window, const torch::Tensor& coefficients, torch::Tensor& result) {
  const float* c = coefficients.data_ptr<float>();
  float* out = result.data_ptr<float>();
  for_each_tile<T>(window, [&](int64_t k0, int64_t count, int64_t j, const T* const* rows, int rows_here) {
    if (j == 0) std::fill(out + k0, out + k0 + count, 0.f);  // zeroed by the thread that accumulates it
    axpy_rows(c + j, rows, rows_here, out + k0, count);
  });
}

// Row-sparse parts: slot j holds rows indices[j, :] with values[j, :, :] (padding: row 0 with zero values).

// s_j = Σ_r ⟨values[j, r], dense[indices[j, r]]⟩, slots split over threads.
template <typename T>
static torch::Tensor sparse_dots_impl(const torch::Tensor& indices, const torch::Tensor& values, const torch::Tensor& dense) {
  const int64_t m = values.size(0), capacity = values.size(1), columns = values.size(2);
  auto result = torch::empty({m}, torch::kFloat64);
  double* out = result.data_ptr<double>();
  const int64_t* index = indices.data_ptr<int64_t>();
  const T* v = reinterpret_cast<const T*>(values.data_ptr());
  const float* g = dense.data_ptr<float>();
  at::parallel_for(0, m, 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      double total = 0.0;
      for (int64_t r = 0; r < capacity; ++r)
        total += dot(v + (j * capacity + r) * columns, g + index[j * capacity + r] * columns, columns);
      out[j] = total;
    }
  });
  return result;
}

// result = Σ_j c_j · (slot j scattered into rows × columns); columns split over threads, so no two threads
// ever add into the same element.
template <typename T>
static void sparse_combine_impl(const torch::Tensor& indices, const torch::Tensor& values,
                                const torch::Tensor& coefficients, torch::Tensor& result) {
  const int64_t m = values.size(0), capacity = values.size(1), columns = values.size(2);
  const int64_t* index = indices.data_ptr<int64_t>();
  const T* v = reinterpret_cast<const T*>(values.data_ptr());
  const float* c = coefficients.data_ptr<float>();
  float* out = result.data_ptr<float>();
  result.zero_();
  at::parallel_for(0, columns, 8, [&](int64_t c0, int64_t c1) {
    for (int64_t j = 0; j < m; ++j)
      for (int64_t r = 0; r < capacity; ++r)
        axpy(c[j], v + (j * capacity + r) * columns + c0, out + index[j * capacity + r] * columns + c0, c1 - c0);
  });
}

torch::Tensor sparse_dots(torch::Tensor indices, torch::Tensor values, torch::Tensor dense) {
  return values.scalar_type() == torch::kBFloat16 ? sparse_dots_impl<uint16_t>(indices, values, dense)
                                                  : sparse_dots_impl<float>(indices, values, dense);
}

void sparse_combine(torch::Tensor indices, torch::Tensor values, torch::Tensor coefficients, torch::Tensor result) {
  if (values.scalar_type() == torch::kBFloat16) sparse_combine_impl<uint16_t>(indices, values, coefficients, result);
  else sparse_combine_impl<float>(indices, values, coefficients, result);
}

torch::Tensor window_dots(torch::Tensor window, int64_t slot) {
  return window.scalar_type() == torch::kBFloat16 ? dots_impl<uint16_t>(window, slot) : dots_impl<float>(window, slot);
}

void window_combine(torch::Tensor window, torch::Tensor coefficients, torch::Tensor result) {
  if (window.scalar_type() == torch::kBFloat16) combine_impl<uint16_t>(window, coefficients, result);
  else combine_impl<float>(window, coefficients, result);
}
"""

_cpu_kernels = None  # the compiled module, False once a build failed


def cpu_kernels():
    """The fused CPU passes, compiled on first use (about a minute, then cached by torch); None if no compiler
    is available, in which case the blocked torch passes serve instead."""
    global _cpu_kernels
    if _cpu_kernels is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load_inline

            # The folder torch builds in (per Python and torch flavour); private, but stable since torch 1.x.
            _remove_stale_build_lock(os.path.join(_get_build_directory("mfac_cpu_kernels", False), "lock"))
            _cpu_kernels = load_inline(
                name="mfac_cpu_kernels", cpp_sources=CPU_KERNELS, functions=["window_dots", "window_combine", "sparse_dots", "sparse_combine"],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as error:  # no compiler, no ninja, unsupported platform
            warnings.warn(f"MFAC: fused CPU kernels unavailable ({type(error).__name__}: {error}); using torch passes")
            _cpu_kernels = False
    return _cpu_kernels or None


def _remove_stale_build_lock(path: str, max_age_seconds: float = 600) -> None:
    """torch's builder waits, without end, for the lock file of a build in progress; a process killed during
    the build (about a minute) leaves the file behind, and every later process would hang on it."""
    try:
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return
    if age > max_age_seconds:
        warnings.warn(f"MFAC: removing the stale lock {path} left {age / 60:.0f} minutes ago by a kernel build")
        os.remove(path)


def fused_kernels_for(storage: Tensor, accumulate_dtype: torch.dtype):
    """The fused CPU kernels if they apply to this window storage (CPU, fp32 or bf16, contiguous, fp32
    accumulation), else None."""
    applies = (storage.device.type == "cpu" and accumulate_dtype == torch.float32 and storage.is_contiguous()
               and storage.dtype in (torch.float32, torch.bfloat16))
    return cpu_kernels() if applies else None


def resolve_grad_dtype(value: Union[str, torch.dtype]) -> str:
    """Returns the canonical name ("float32", "bfloat16", "float16") of a window dtype given as name or dtype."""
    for name, dtype in GRAD_DTYPES.items():
        if value == name or value is dtype:
            return name
    raise ValueError(f"Invalid grad_dtype: {value!r} (allowed: {', '.join(GRAD_DTYPES)} or the torch dtypes)")


@dataclass(frozen=True)
class Block:
    """The rows of one parameter (seen as a rows × columns matrix; a vector is a column) whose window this rank
    keeps, and where they lie in the flat gradient of all parameters."""

    index: int  # of the parameter, in the order of the param groups
    flat: slice
    rows: int
    columns: int
    matrix: bool  # the parameter is 2-D, so its block may be stored row-sparse

    @property
    def size(self) -> int:
        return self.rows * self.columns


def shard_blocks(shapes: list[torch.Size], rank: int, world_size: int) -> list[Block]:
    """Rank `rank`'s block of every parameter: each parameter's rows (elements, for a vector) are split into
    `world_size` contiguous ranges of near-equal length, so each rank keeps 1/world_size of the window to within
    one row per parameter, and of every embedding matrix, whose rows are stored row-sparse."""
    blocks, offset = [], 0
    for index, shape in enumerate(shapes):
        numel = math.prod(shape)
        rows, columns = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (numel, 1)
        first, last = rows * rank // world_size, rows * (rank + 1) // world_size
        blocks.append(Block(index, slice(offset + first * columns, offset + last * columns), last - first, columns,
                            len(shape) == 2))
        offset += numel
    return blocks


class DenseRows:
    """The dense part of the window: row j holds the stored gradient j restricted to the dense parameters."""

    def __init__(self, window: Tensor, accumulate_dtype: torch.dtype) -> None:
        self.window = window  # (m, n), storage dtype
        self.accumulate_dtype = accumulate_dtype
        self._block_buffer: Optional[Tensor] = None
        self._direction_buffer: Optional[Tensor] = None
        self._fused = fused_kernels_for(window, accumulate_dtype)

    def store(self, slot: int, grad: Tensor) -> None:
        self.window[slot].copy_(grad)

    def dots(self, slot: int) -> Tensor:
        """G ĝ in float64 over these columns, ĝ = the stored row `slot` (first pass over the window)."""
        if self._fused is not None:
            return self._fused.window_dots(self.window, slot)
        stored = self.window[slot]
        dots = torch.zeros(self.window.shape[0], dtype=torch.float64, device=self.window.device)
        for columns, block in self._column_blocks():
            dots += torch.mv(block, stored[columns].to(self.accumulate_dtype))
        return dots

    def combine(self, coefficients: Tensor) -> Tensor:
        """Gᵀ c in fp32 over these columns (second pass over the window)."""
        if self._fused is not None:
            if self._direction_buffer is None:
                self._direction_buffer = torch.empty(self.window.shape[1], dtype=torch.float32)
            self._fused.window_combine(self.window, coefficients.float(), self._direction_buffer)
            return self._direction_buffer
        result = torch.empty(self.window.shape[1], dtype=torch.float32, device=self.window.device)
        coefficients = coefficients.to(self.accumulate_dtype)
        for columns, block in self._column_blocks():
            result[columns] = torch.mv(block.t(), coefficients)
        return result

    def _column_blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """The window in blocks of columns, in the accumulation dtype. A block of another dtype is converted into
        one reused buffer: fresh allocations of this size cost more in page faults than the conversion."""
        for start in range(0, self.window.shape[1], BLOCK_COLUMNS):
            columns = slice(start, start + BLOCK_COLUMNS)
            block = self.window[:, columns]
            if block.dtype != self.accumulate_dtype:
                if self._block_buffer is None:
                    self._block_buffer = torch.empty(self.window.shape[0], min(BLOCK_COLUMNS, self.window.shape[1]),
                                                     dtype=self.accumulate_dtype, device=self.window.device)
                block = self._block_buffer[:, :block.shape[1]].copy_(block)
            yield columns, block


class RowSparseRows:
    """The window restricted to one matrix parameter whose gradients are zero outside a few rows (a word
    embedding: only the rows of the batch's tokens). Slot j keeps (row indices, row values), padded to a common
    capacity with row 0 and zero values, which add nothing to any dot product or combination, so all stay exact.
    """

    # Slots per gather in the passes: bounds the temporary (slots × capacity × columns) fp32 block.
    SLOTS_PER_CHUNK = 64
    # A slot with more rows than the capacity grows it by at least this factor (5/4), so that a slowly rising
    # row count does not reallocate the window at every step.
    GROWTH_NUMERATOR, GROWTH_DENOMINATOR = 5, 4

    def __init__(self, indices: Tensor, values: Tensor, num_rows: int, accumulate_dtype: torch.dtype) -> None:
        self.indices = indices  # (m, capacity) int64
        self.values = values  # (m, capacity, columns), storage dtype
        self.num_rows = num_rows
        self.accumulate_dtype = accumulate_dtype
        self._fused = fused_kernels_for(values, accumulate_dtype)

    @staticmethod
    def nonzero_rows(grad: Tensor) -> Tensor:
        return (grad != 0).any(dim=1).nonzero().squeeze(1)

    @staticmethod
    def pays(rows_used: int, shape: torch.Size, element_size: int, margin: float = 1.0) -> bool:
        """Whether rows plus their int64 indices take less than `margin` × the dense row of this matrix."""
        return rows_used * (shape[1] * element_size + 8) < margin * shape[0] * shape[1] * element_size

    @classmethod
    def allocate(cls, num_grads: int, capacity: int, columns: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        return (torch.zeros(num_grads, capacity, dtype=torch.int64, device=device),
                torch.zeros(num_grads, capacity, columns, dtype=dtype, device=device))

    def store(self, slot: int, grad: Tensor, rows: Tensor) -> None:
        """Stores `rows` of `grad` (rows × columns; the others are zero), growing the capacity if needed."""
        if len(rows) > self.indices.shape[1]:
            self._grow(len(rows))
        self.indices[slot].zero_()
        self.values[slot].zero_()
        self.indices[slot, :len(rows)] = rows
        self.values[slot, :len(rows)] = grad[rows]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, self.indices.shape[1] * self.GROWTH_NUMERATOR // self.GROWTH_DENOMINATOR)
        indices, values = self.allocate(self.indices.shape[0], capacity, self.values.shape[2], self.values.dtype,
                                        self.values.device)
        indices[:, :self.indices.shape[1]] = self.indices
        values[:, :self.values.shape[1]] = self.values
        self.indices, self.values = indices, values

    def dots(self, slot: int) -> Tensor:
        """s_j = Σ over the rows of slot j of ⟨stored row, new gradient's row⟩, in float64."""
        new = torch.zeros(self.num_rows, self.values.shape[2], dtype=self.accumulate_dtype, device=self.values.device)
        new.index_add_(0, self.indices[slot], self.values[slot].to(self.accumulate_dtype))  # padding adds zeros
        if self._fused is not None:
            return self._fused.sparse_dots(self.indices, self.values, new)
        dots = torch.empty(self.indices.shape[0], dtype=torch.float64, device=self.values.device)
        for chunk in self._slot_chunks():
            products = new[self.indices[chunk]] * self.values[chunk].to(self.accumulate_dtype)
            dots[chunk] = products.sum(dim=(1, 2), dtype=torch.float64)
        return dots

    def combine(self, coefficients: Tensor) -> Tensor:
        """Σ_j c_j · (slot j scattered into a rows × columns matrix), accumulated in fp32 or better."""
        if self._fused is not None:
            result = torch.empty(self.num_rows, self.values.shape[2], dtype=torch.float32)
            self._fused.sparse_combine(self.indices, self.values, coefficients.float(), result)
            return result
        result = torch.zeros(self.num_rows, self.values.shape[2], dtype=self.accumulate_dtype, device=self.values.device)
        coefficients = coefficients.to(self.accumulate_dtype)
        for chunk in self._slot_chunks():
            scaled = self.values[chunk].to(self.accumulate_dtype) * coefficients[chunk, None, None]
            result.index_add_(0, self.indices[chunk].reshape(-1), scaled.reshape(-1, self.values.shape[2]))
        return result.float()

    def to_dense(self) -> Tensor:
        """The same window as dense rows (m × rows·columns), exactly."""
        dense = torch.zeros(self.indices.shape[0], self.num_rows, self.values.shape[2], dtype=self.values.dtype,
                            device=self.values.device)
        dense.scatter_add_(1, self.indices[:, :, None].expand_as(self.values), self.values)  # padding adds zeros
        return dense.reshape(self.indices.shape[0], -1)

    def _slot_chunks(self) -> Iterator[slice]:
        for start in range(0, self.indices.shape[0], self.SLOTS_PER_CHUNK):
            yield slice(start, start + self.SLOTS_PER_CHUNK)


class GradientWindow:
    """A ring buffer of m gradients (dense rows plus row-sparse parts) with its float64 Gram matrix S = GGᵀ;
    computes u = F⁻¹ĝ for each new gradient ĝ. It works on tensors it is handed (the optimizer keeps them in its
    state). When the columns are sharded across processes, `sum_shards` adds up each process's partial dot
    products, so that every process holds the same Gram matrix and coefficients, and the direction for its columns.
    """

    def __init__(self, dense: DenseRows, sparse: dict[int, RowSparseRows], gram: Tensor, damp: float,
                 sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.dense = dense
        self.sparse = sparse  # parameter index -> its row-sparse part
        self.gram = gram
        self.damp = damp
        self.sum_shards = sum_shards

    @staticmethod
    def accumulate_dtype(num_grads: int, dim: int) -> torch.dtype:
        # When d is not far above m, the window is (nearly) rank-deficient: σ_min(G) ∝ √d − √m for gradient-like
        # data, and exactly 0 once d < m. Then y = K⁻¹eᵢ has components of size up to 1/(mλ) along (near-)null
        # directions of Gᵀ, which must cancel in Gᵀy, and fp32 passes lose up to three digits at λ = 1e-6.
        # Such a window holds at most 4m² numbers, so float64 passes cost less than the m³/3 Cholesky.
        return torch.float64 if dim < 4 * num_grads else torch.float32

    @property
    def num_grads(self) -> int:
        return self.gram.shape[0]

    def insert_and_precondition(self, dense_grad: Tensor, sparse_grads: dict[int, tuple[Tensor, Tensor]], slot: int
                                ) -> tuple[Tensor, dict[int, Tensor]]:
        """Stores the gradient in row `slot` and returns F⁻¹ĝ in fp32 (dense part, and each row-sparse matrix),
        where ĝ is the stored (possibly rounded) row. `sparse_grads` maps a parameter index to its gradient matrix
        and the indices of its non-zero rows."""
        self.dense.store(slot, dense_grad)
        for index, (grad, rows) in sparse_grads.items():
            self.sparse[index].store(slot, grad, rows)
        dots = self.dense.dots(slot) + sum((part.dots(slot) for part in self.sparse.values()), torch.zeros_like(self.gram[0]))
        if self.sum_shards is not None:
            dots = self.sum_shards(dots)
        self.gram[slot, :] = dots
        self.gram[:, slot] = dots
        coefficients = self.num_grads * self.inverse_kernel_column(slot)
        return self.dense.combine(coefficients), {index: part.combine(coefficients) for index, part in self.sparse.items()}

    def inverse_kernel_column(self, slot: int) -> Tensor:
        """y = K⁻¹ eᵢ with K = mλI + S, by a float64 Cholesky factorisation."""
        kernel = self.gram.clone()
        kernel.diagonal().add_(self.num_grads * self.damp)
        unit = torch.zeros(self.num_grads, 1, dtype=torch.float64, device=self.gram.device)
        unit[slot] = 1.0
        return torch.cholesky_solve(unit, torch.linalg.cholesky(kernel)).squeeze(1)


def memory_bound_bytes(shapes: list[torch.Size], max_rows: dict[int, int], num_grads: int,
                       grad_dtype: Union[str, torch.dtype] = torch.float32, momentum: bool = False,
                       world_size: int = 1) -> int:
    """An upper bound, before any gradient is seen, of the bytes one process of MFAC needs: its state (window,
    Gram matrix, momentum) plus the buffers of a step.

    `shapes` are the parameters' shapes in order. `max_rows[i]` bounds how many rows of matrix parameter i one
    gradient can touch (an embedding: the tokens in a batch), so that its row-sparse storage is bounded with its
    capacity's growth; every other parameter is counted as dense.
    """
    element_size = torch.tensor([], dtype=GRAD_DTYPES[resolve_grad_dtype(grad_dtype)]).element_size()
    layouts = [shard_blocks(shapes, rank, world_size) for rank in range(world_size)]
    window_bytes = 0
    for index, shard_of_each_rank in enumerate(zip(*layouts)):
        largest = max(shard_of_each_rank, key=lambda block: block.size)
        dense = num_grads * largest.size * element_size
        if index in max_rows and largest.matrix:
            growth = RowSparseRows.GROWTH_NUMERATOR / RowSparseRows.GROWTH_DENOMINATOR
            capacity = min(largest.rows, math.ceil(max_rows[index] * growth))
            sparse = num_grads * capacity * (largest.columns * element_size + 8)
            # Rows that pay stay row-sparse; others move to dense storage once their slots no longer pay.
            dense = sparse if RowSparseRows.pays(capacity, (largest.rows, largest.columns), element_size) \
                else max(dense, sparse)
        window_bytes += dense
    total = sum(math.prod(shape) for shape in shapes)
    local = max(sum(block.size for block in layout) for layout in layouts)
    accumulate_size = GradientWindow.accumulate_dtype(num_grads, total).itemsize
    buffers = (8 * total  # the flat gradient and its fp32 pieces
               + 4 * local * (2 if momentum else 1)  # the direction, and the momentum
               + num_grads * min(BLOCK_COLUMNS, local) * accumulate_size)  # the unfused passes' conversion block
    if world_size > 1:
        buffers += 4 * ((world_size + 1) * local + total)  # all-gather pieces and the full direction
    return window_bytes + 8 * num_grads * num_grads + buffers


def _check_finite_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number > 0)")


def _check_group_hyperparameters(group: dict) -> None:
    lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0 or not math.isfinite(lr):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0 or not math.isfinite(weight_decay):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be a finite number >= 0)")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"Invalid momentum: {momentum!r} (must satisfy 0 <= momentum < 1)")
    num_grads = group["num_grads"]
    if not isinstance(num_grads, int) or isinstance(num_grads, bool) or num_grads < 1:
        raise ValueError(f"Invalid num_grads: {num_grads!r} (must be a positive integer)")
    _check_finite_positive("damp", group["damp"])
    if not isinstance(group["shard"], bool):
        raise ValueError(f"Invalid shard: {group['shard']!r} (must be true or false)")


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    dist.all_reduce(tensor)
    return tensor


class MFAC(Optimizer):
    """M-FAC with a window of the last `num_grads` gradients over all parameters of all groups.

    Args:
        params: tensors or param-group dicts. `lr`, `weight_decay` and `momentum` may differ per group;
            `num_grads`, `damp` and `grad_dtype` describe the one shared window and must not.
        lr: learning rate, read from the group at every step (LR schedulers work).
        num_grads: m, the number of gradients in the window.
        damp: λ in F = λI + (1/m) GᵀG.
        momentum: μ of the exponential average v ← μv + (1 − μ)u of the directions (0 disables it).
        weight_decay: coupled L2: g ← g + weight_decay · p before g enters the window.
        grad_dtype: storage dtype of the window ("float32", "bfloat16", "float16" or the torch dtype). With a
            low-precision window the rounded gradient is the one preconditioned, so window and direction agree.
        shard: with an initialised default process group (torchrun, accelerate), each rank keeps 1/world_size of
            every parameter's rows in its window; the dot products are all-reduced and the direction all-gathered,
            so every rank takes the same step as one unsharded optimizer. Ranks must see the same gradients (as
            under DDP). Without a process group this changes nothing. State dicts are per rank.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        num_grads: int = 1024,
        damp: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        grad_dtype: Union[str, torch.dtype] = torch.float32,
        shard: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            num_grads=num_grads,
            damp=damp,
            momentum=momentum,
            weight_decay=weight_decay,
            grad_dtype=resolve_grad_dtype(grad_dtype),
            shard=shard,
        )
        _check_group_hyperparameters(defaults)
        self._warned_nonfinite = False
        self._dense_rows: Optional[DenseRows] = None  # reused across steps for its buffers
        self._flat_buffer: Optional[Tensor] = None
        self._gather_buffers: Optional[tuple[Tensor, Tensor]] = None  # (own + gathered pieces, full direction)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "grad_dtype" in param_group:
            param_group["grad_dtype"] = resolve_grad_dtype(param_group["grad_dtype"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group_hyperparameters(group)
        first = self.param_groups[0]
        for key in WINDOW_KEYS:
            if group[key] != first[key]:
                raise ValueError(
                    f"Invalid {key} in param group {len(self.param_groups) - 1}: {group[key]!r} "
                    f"(all groups share one window, so it must equal {first[key]!r})"
                )
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim, except that state tensors keep their dtypes: torch would cast the float64 Gram matrix,
        a bf16 window and the fp32 momentum to each parameter's dtype."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        for index, param in zip(saved_ids, self._params()):
            if index in state_dict["state"]:
                self.state[param] = {key: value.to(device=param.device, copy=True) if key not in COUNTERS else value.clone()
                                     for key, value in state_dict["state"][index].items()}
        self._dense_rows = None
        if self._params() and "window" in self.state[self._params()[0]]:
            self._check_shard_position(self.state[self._params()[0]])

    def memory_bytes(self) -> int:
        """Bytes of state this optimizer holds in this process (its shard of the window, the Gram matrix, momentum,
        row-sparse parts)."""
        return sum(value.numel() * value.element_size() for state in self.state.values() for value in state.values()
                   if torch.is_tensor(value))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Performs one M-FAC step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        params = self._params()
        grad = self._flat_gradient()
        # A sum is finite whenever all terms are, unless it overflows: only then is the full check needed.
        if not torch.isfinite(grad.sum()) and not torch.isfinite(grad).all():
            self._skip_nonfinite()
            return loss
        rank, world_size = self._shard_position()
        blocks = shard_blocks([p.shape for p in params], rank, world_size)
        state = self._window_state(params, blocks, grad)
        self._check_shard_position(state)
        sparse_grads = self._sparse_gradients(params, blocks, grad, state)
        window = self._gradient_window(params, blocks, state)
        slot = int(state["step"]) % window.num_grads
        dense_direction, sparse_directions = window.insert_and_precondition(
            self._dense_part(params, blocks, grad), sparse_grads, slot)
        for index, part in window.sparse.items():  # a part may have grown its capacity
            self.state[params[index]].update(row_indices=part.indices, row_values=part.values)
        state["step"] += 1
        update = self._with_momentum(blocks, self._assemble(params, blocks, dense_direction, sparse_directions), state)
        if world_size > 1:
            update = self._gather_direction(params, update, world_size)
        self._update_params(update)
        return loss

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _is_row_sparse(self, param: Tensor) -> bool:
        return "row_indices" in self.state[param]

    def _flat_gradient(self) -> Tensor:
        """g over all groups in order: each parameter's gradient (zeros if None) plus its group's wd · p."""
        pieces = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients; use dense embedding gradients")
                grad = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
                if group["weight_decay"] != 0:
                    grad = grad.add(p.float(), alpha=group["weight_decay"])
                pieces.append(grad.reshape(-1))
        # Written into one reused buffer: a fresh allocation of d floats costs page faults every step.
        if self._flat_buffer is None or self._flat_buffer.numel() != sum(piece.numel() for piece in pieces):
            self._flat_buffer = torch.empty(sum(piece.numel() for piece in pieces), device=pieces[0].device)
        return torch.cat(pieces, out=self._flat_buffer)

    def _shard_position(self) -> tuple[int, int]:
        """(rank, world size) of this process's shard of the window: the default process group's with shard=True."""
        if self.param_groups[0]["shard"] and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _check_shard_position(self, state: dict) -> None:
        saved = int(state["shard_rank"]), int(state["shard_world_size"])
        rank, world_size = self._shard_position()
        if saved != (rank, world_size):
            raise ValueError(
                f"MFAC state holds the window shard of rank {saved[0]} of {saved[1]}, but this process is rank {rank} "
                f"of {world_size}: resume a sharded run with the same number of processes, each loading its own state")

    def _window_state(self, params: list[Tensor], blocks: list[Block], grad: Tensor) -> dict:
        """The shared state (kept under the first parameter, as torch.optim.LBFGS does), made on first use. Then
        each matrix block whose gradient has few non-zero rows gets row-sparse storage in its parameter's state:
        this pays when rows and their indices take at most half the dense size (word embeddings; not with weight
        decay)."""
        state = self.state[params[0]]
        if "window" in state:
            return state
        first = self.param_groups[0]
        m, dtype = first["num_grads"], GRAD_DTYPES[first["grad_dtype"]]
        element_size = torch.tensor([], dtype=dtype).element_size()
        for block in blocks:
            if block.matrix:
                rows = RowSparseRows.nonzero_rows(grad[block.flat].view(block.rows, block.columns))
                if RowSparseRows.pays(len(rows), (block.rows, block.columns), element_size, margin=0.5):
                    indices, values = RowSparseRows.allocate(m, max(len(rows), 1), block.columns, dtype, grad.device)
                    self.state[params[block.index]].update(row_indices=indices, row_values=values)
        rank, world_size = self._shard_position()
        state.update(
            step=torch.tensor(0, dtype=torch.int64),
            skipped_steps=state.get("skipped_steps", torch.tensor(0, dtype=torch.int64)),  # skips before this
            shard_rank=torch.tensor(rank, dtype=torch.int64),
            shard_world_size=torch.tensor(world_size, dtype=torch.int64),
            window=torch.zeros(m, sum(block.size for block in self._dense_blocks(params, blocks)), dtype=dtype,
                               device=grad.device),
            gram=torch.zeros(m, m, dtype=torch.float64, device=grad.device),
        )
        return state

    def _dense_blocks(self, params: list[Tensor], blocks: list[Block]) -> list[Block]:
        return [block for block in blocks if not self._is_row_sparse(params[block.index])]

    def _sparse_gradients(self, params: list[Tensor], blocks: list[Block], grad: Tensor, state: dict
                          ) -> dict[int, tuple[Tensor, Tensor]]:
        """Parameter index -> (gradient block, its non-zero rows) for the row-sparse blocks. One whose rows would
        now take more room than dense storage (e.g. weight decay was turned on) moves to the dense part."""
        sparse = {}
        for block in blocks:
            if not self._is_row_sparse(params[block.index]):
                continue
            matrix = grad[block.flat].view(block.rows, block.columns)
            rows = RowSparseRows.nonzero_rows(matrix)
            if RowSparseRows.pays(len(rows), matrix.shape, state["window"].element_size()):
                sparse[block.index] = (matrix, rows)
            else:
                self._move_to_dense(params, blocks, block.index, state)
        return sparse

    def _move_to_dense(self, params: list[Tensor], blocks: list[Block], index: int, state: dict) -> None:
        """Inserts a row-sparse block's window, made dense, at its place among the dense columns."""
        param_state = self.state[params[index]]
        part = RowSparseRows(param_state.pop("row_indices"), param_state.pop("row_values"), blocks[index].rows,
                             torch.float32)
        column = sum(block.size for block in self._dense_blocks(params, blocks[:index]))
        window = state["window"]
        state["window"] = torch.cat([window[:, :column], part.to_dense(), window[:, column:]], dim=1)

    def _dense_part(self, params: list[Tensor], blocks: list[Block], grad: Tensor) -> Tensor:
        dense = self._dense_blocks(params, blocks)
        if sum(block.size for block in dense) == grad.numel():
            return grad
        return torch.cat([grad[block.flat] for block in dense])

    def _gradient_window(self, params: list[Tensor], blocks: list[Block], state: dict) -> GradientWindow:
        """A view of the state tensors as a GradientWindow; the dense part (with its conversion buffer) is reused
        while the window tensor stays the same."""
        first = self.param_groups[0]
        accumulate = GradientWindow.accumulate_dtype(first["num_grads"], sum(p.numel() for p in params))
        if self._dense_rows is None or self._dense_rows.window is not state["window"]:
            self._dense_rows = DenseRows(state["window"], accumulate)
        sparse = {block.index: RowSparseRows(self.state[params[block.index]]["row_indices"],
                                             self.state[params[block.index]]["row_values"], block.rows, accumulate)
                  for block in blocks if self._is_row_sparse(params[block.index])}
        sum_shards = _all_reduce_sum if self._shard_position()[1] > 1 else None
        return GradientWindow(self._dense_rows, sparse, state["gram"], first["damp"], sum_shards)

    def _assemble(self, params: list[Tensor], blocks: list[Block], dense_direction: Tensor,
                  sparse_directions: dict[int, Tensor]) -> Tensor:
        """This rank's blocks of the direction, in flat order, from the dense part and the row-sparse parts."""
        if not sparse_directions:
            return dense_direction
        direction = torch.empty(sum(block.size for block in blocks), device=dense_direction.device)
        offset = dense_offset = 0
        for block in blocks:
            piece = direction[offset:offset + block.size]
            if block.index in sparse_directions:
                piece.copy_(sparse_directions[block.index].reshape(-1))
            else:
                piece.copy_(dense_direction[dense_offset:dense_offset + block.size])
                dense_offset += block.size
            offset += block.size
        return direction

    def _gather_direction(self, params: list[Tensor], local: Tensor, world_size: int) -> Tensor:
        """The full direction from every rank's blocks (all-gathered, each padded to the longest), in buffers
        reused across steps."""
        shapes = [p.shape for p in params]
        layouts = [shard_blocks(shapes, rank, world_size) for rank in range(world_size)]
        longest = max(sum(block.size for block in layout) for layout in layouts)
        if self._gather_buffers is None or self._gather_buffers[0].shape != (world_size + 1, longest):
            self._gather_buffers = (torch.zeros(world_size + 1, longest, device=local.device),
                                    torch.empty(sum(p.numel() for p in params), device=local.device))
        pieces, direction = self._gather_buffers
        padded, gathered = pieces[0], list(pieces[1:])
        padded[:local.numel()] = local
        dist.all_gather(gathered, padded)
        for layout, piece in zip(layouts, gathered):
            offset = 0
            for block in layout:
                direction[block.flat] = piece[offset:offset + block.size]
                offset += block.size
        return direction

    def _skip_nonfinite(self) -> None:
        # Counted under the first parameter, where the window state will be made: before the first stored gradient
        # this is the only entry there, and state_dict() carries it like any other.
        state = self.state[self._params()[0]]
        state["skipped_steps"] = state.get("skipped_steps", torch.tensor(0, dtype=torch.int64)) + 1
        if not self._warned_nonfinite:
            warnings.warn("MFAC: gradient contains NaN or Inf; step skipped (window and parameters unchanged)")
            self._warned_nonfinite = True

    def _with_momentum(self, blocks: list[Block], direction: Tensor, state: dict) -> Tensor:
        """This rank's update: per group with momentum μ > 0, v ← μv + (1 − μ)u (kept for this rank's blocks),
        written over u; u itself elsewhere."""
        momenta = [group["momentum"] for group in self.param_groups for _ in group["params"]]
        if not any(momenta):
            return direction
        buffer = state.setdefault("momentum_buffer", torch.zeros_like(direction))
        offset = 0
        for block in blocks:
            momentum = momenta[block.index]
            if momentum > 0:
                velocity = buffer[offset:offset + block.size]
                velocity.mul_(momentum).add_(direction[offset:offset + block.size], alpha=1 - momentum)
                direction[offset:offset + block.size] = velocity
            offset += block.size
        return direction

    def _update_params(self, update: Tensor) -> None:
        """p ← p − lr · update, with each group's lr."""
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(update[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
