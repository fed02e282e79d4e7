// One step of the m × m factor (mfac_optim/algebra.py): R is upper triangular, row-major, with RᵀR = K over the
// slots in chronological order. The oldest slot leaves and the newest arrives:
//   1. Dropping slot 0: with K = [[a, bᵀ], [b, K₂₂]] and R = [[ρ, xᵀ], [0, R₂₂]], K₂₂ = R₂₂ᵀR₂₂ + xxᵀ, a positive
//      rank-1 update; Givens rotations of each row of R₂₂ with x give its factor R′ (no cancellation, stable).
//   2. Appending the newest slot, K[:, new] = (c, d): R′ᵀw = c by forward substitution, δ = √(d − wᵀw).
// Both sweep the rows once and together: row k of R′ is final as soon as it is rotated, so w_k follows at once and
// c's remaining entries take its column-oriented update (c ← c − w_k R′[k, :]). Row k + 1 of R becomes row k of R′,
// one column to the left, written over row k, which is consumed by then: the factor is updated in place.
#include "kernels.h"
#include <cmath>
#include <vector>

// While the window fills, the slot that leaves is an empty one (filled < n): rows and columns before the last
// `filled` hold √(mλ) I, which the sweep would copy onto itself, so it starts at row n − filled.
void factor_drop_oldest_append_newest(at::Tensor factor, at::Tensor column, double diagonal, int64_t filled) {
  TORCH_CHECK(factor.device().is_cpu() && factor.scalar_type() == at::kDouble && factor.is_contiguous(),
              "factor: a contiguous CPU float64 matrix");
  const int64_t n = factor.size(0);
  TORCH_CHECK(column.numel() == n - 1, "column: the newest slot's n - 1 entries of K");
  TORCH_CHECK(filled >= 1 && filled <= n, "filled: between 1 and n");
  double* R = factor.data_ptr<double>();
  std::vector<double> x(R + 1, R + n);  // the oldest slot's row beyond its diagonal, x[j] for column j + 1
  auto remaining = column.to(at::kDouble).contiguous();
  std::vector<double> c(remaining.data_ptr<double>(), remaining.data_ptr<double>() + n - 1);
  double norm_w = 0.0;
  for (int64_t k = n - filled; k + 1 < n; ++k) {
    const double* __restrict__ below = R + (k + 1) * n + (k + 1);  // R₂₂ row k, from its diagonal on
    double* __restrict__ out = R + k * n + k;                       // R′ row k, from its diagonal on
    double* __restrict__ xs = x.data() + k;
    double* __restrict__ cs = c.data() + k;
    const double r = std::hypot(below[0], xs[0]);
    const double cosine = below[0] / r, sine = xs[0] / r;
    const double w = cs[0] / r;
    out[0] = r;
    const int64_t count = n - 1 - k;
    for (int64_t t = 1; t < count; ++t) {
      const double rotated = cosine * below[t] + sine * xs[t];
      xs[t] = cosine * xs[t] - sine * below[t];
      out[t] = rotated;
      cs[t] -= w * rotated;
    }
    out[count] = w;  // R[k, n - 1]: the newest slot's column
    norm_w += w * w;
  }
  double* last = R + (n - 1) * n;
  std::fill(last, last + n - 1, 0.0);
  // Not positive only if rounding has ruined the factor: the NaN makes the caller's residual check refactor.
  last[n - 1] = std::sqrt(diagonal - norm_w);
}
