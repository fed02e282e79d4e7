// The two window passes on the CPU, fused: each bf16 element is widened to fp32 in registers and consumed at once,
// so the window is read exactly once per pass and no fp32 copy of it exists. Column blocks go to threads; within a
// block every row's segment is streamed, with per-block fp32 partial sums added up in float64.
// Built on first use by mfac_optim.kernels (torch's extension builder); the Python side is mfac_optim/storage.py.
#include "kernels.h"
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>
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
// out[r] += ⟨rows[r], v⟩ for r < count_rows ≤ 4. A group of fewer rows (the last of a window filled up to a row count
// that is not a multiple of 4) repeats its first row in the unused lanes, so every row's sum is formed in the same
// order whatever the group: the dots of a filling window are those the full window gives its filled rows.
template <typename T>
static void dots_four_rows(const T* const* group, int count_rows, const T* v, int64_t count, double* out) {
  const T* rows[4];
  for (int r = 0; r < 4; ++r) rows[r] = group[r < count_rows ? r : 0];
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
  for (int r = 0; r < count_rows; ++r) out[r] += totals[r];
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
static void for_each_tile(const at::Tensor& window, Visit visit) {
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
static at::Tensor dots_impl(const at::Tensor& window, int64_t slot) {
  const int64_t m = window.size(0);
  const T* v = reinterpret_cast<const T*>(window.data_ptr()) + slot * window.size(1);
  auto partial = at::zeros({at::get_num_threads(), m}, at::kDouble);
  double* p = partial.data_ptr<double>();
  for_each_tile<T>(window, [&](int64_t k0, int64_t count, int64_t j, const T* const* rows, int rows_here) {
    double* mine = p + at::get_thread_num() * m + j;
#ifdef __AVX2__
    dots_four_rows(rows, rows_here, v + k0, count, mine);
#else
    for (int r = 0; r < rows_here; ++r) mine[r] += dot(rows[r], v + k0, count);
#endif
  });
  return partial.sum(0);
}

// Gᵀ c into `result` (reused across steps: a fresh buffer of this size costs page faults every step).
template <typename T>
static void combine_impl(const at::Tensor& window, const at::Tensor& coefficients, at::Tensor& result) {
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
static at::Tensor sparse_dots_impl(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& dense) {
  const int64_t m = values.size(0), capacity = values.size(1), columns = values.size(2);
  auto result = at::empty({m}, at::kDouble);
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
static void sparse_combine_impl(const at::Tensor& indices, const at::Tensor& values,
                                const at::Tensor& coefficients, at::Tensor& result) {
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

at::Tensor sparse_dots(at::Tensor indices, at::Tensor values, at::Tensor dense) {
  return values.scalar_type() == at::kBFloat16 ? sparse_dots_impl<uint16_t>(indices, values, dense)
                                                  : sparse_dots_impl<float>(indices, values, dense);
}

void sparse_combine(at::Tensor indices, at::Tensor values, at::Tensor coefficients, at::Tensor result) {
  if (values.scalar_type() == at::kBFloat16) sparse_combine_impl<uint16_t>(indices, values, coefficients, result);
  else sparse_combine_impl<float>(indices, values, coefficients, result);
}

at::Tensor window_dots(at::Tensor window, int64_t slot) {
  return window.scalar_type() == at::kBFloat16 ? dots_impl<uint16_t>(window, slot) : dots_impl<float>(window, slot);
}

void window_combine(at::Tensor window, at::Tensor coefficients, at::Tensor result) {
  if (window.scalar_type() == at::kBFloat16) combine_impl<uint16_t>(window, coefficients, result);
  else combine_impl<float>(window, coefficients, result);
}

// Compressed window (mfac_optim/compressed.py): values and int16 offsets laid out (blocks, m, kept); a block of
// `block` coordinates, with every slot's entries of it, is one unit of work, so its dense buffer stays in cache.

#ifdef __AVX2__
// low += a · b over lanes 0-3, high over lanes 4-7, widened to float64 (where a product of two floats is exact).
static inline void add_products(__m256 a, __m256 b, __m256d& low, __m256d& high) {
  low = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_castps256_ps128(b)), low);
  high = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)),
                         high);
}
#endif

// Σ_e value[e] · dense[offset[e]] over one slot's `kept` entries of a block, in float64. Each product of two floats
// is exact in float64; the AVX2 form gathers 8 entries at a time into independent partial sums, so the additions
// do not wait on one another.
template <typename T>
static double gathered_dot(const T* values, const uint16_t* offsets, const float* dense, int64_t kept) {
  int64_t e = 0;
  double total = 0.0;
#ifdef __AVX2__
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd();
  for (; e + 16 <= kept; e += 16) {
    const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(offsets + e)));
    const __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(offsets + e + 8)));
    const __m256 g0 = _mm256_i32gather_ps(dense, i0, 4), g1 = _mm256_i32gather_ps(dense, i1, 4);
    const __m256 v0 = load8(values + e), v1 = load8(values + e + 8);
    add_products(v0, g0, s0, s1);
    add_products(v1, g1, s2, s3);
  }
  const __m256d s = _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3));
  const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  total = _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
#endif
  for (; e < kept; ++e) total += double(widen(values[e])) * dense[offsets[e]];
  return total;
}

// s_j = Σ over blocks of ⟨slot j, slot `slot`⟩ for the first `filled` slots: the new slot is scattered into a zeroed
// block buffer and every slot gathers from it. Accumulated in float64 (see CompressedRows.dots): the kept entries
// span a wide dynamic range.
template <typename T>
static at::Tensor compressed_dots_impl(const at::Tensor& values, const at::Tensor& offsets, int64_t slot,
                                       int64_t block, int64_t filled) {
  const int64_t blocks = values.size(0), m = values.size(1), kept = values.size(2);
  auto partial = at::zeros({at::get_num_threads(), filled}, at::kDouble);
  double* p = partial.data_ptr<double>();
  const T* v = reinterpret_cast<const T*>(values.data_ptr());
  const uint16_t* o = reinterpret_cast<const uint16_t*>(offsets.data_ptr<int16_t>());
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> dense(block, 0.f);
    double* mine = p + at::get_thread_num() * filled;
    for (int64_t b = first; b < last; ++b) {
      const T* vb = v + b * m * kept;
      const uint16_t* ob = o + b * m * kept;
      for (int64_t e = 0; e < kept; ++e) dense[ob[slot * kept + e]] = widen(vb[slot * kept + e]);
      for (int64_t j = 0; j < filled; ++j) mine[j] += gathered_dot(vb + j * kept, ob + j * kept, dense.data(), kept);
      for (int64_t e = 0; e < kept; ++e) dense[ob[slot * kept + e]] = 0.f;
    }
  });
  return partial.sum(0);
}

// result (blocks · block, fp32) = Σ_j c_j · slot j over the first `filled` slots; each thread owns whole blocks of
// the result.
template <typename T>
static void compressed_combine_impl(const at::Tensor& values, const at::Tensor& offsets,
                                    const at::Tensor& coefficients, at::Tensor& result, int64_t block,
                                    int64_t filled) {
  const int64_t blocks = values.size(0), m = values.size(1), kept = values.size(2);
  const T* v = reinterpret_cast<const T*>(values.data_ptr());
  const uint16_t* o = reinterpret_cast<const uint16_t*>(offsets.data_ptr<int16_t>());
  const float* c = coefficients.data_ptr<float>();
  float* out = result.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      float* out_b = out + b * block;
      std::fill(out_b, out_b + block, 0.f);
      const T* vb = v + b * m * kept;
      const uint16_t* ob = o + b * m * kept;
      for (int64_t j = 0; j < filled; ++j) {
        const float scale = c[j];
        for (int64_t e = 0; e < kept; ++e) out_b[ob[j * kept + e]] += scale * widen(vb[j * kept + e]);
      }
    }
  });
}

static inline uint16_t round_to_bf16(float x) {  // round to nearest even, as torch rounds float to bfloat16
  uint32_t u; std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline void round_to(float x, float* out) { *out = x; }
static inline void round_to(float x, uint16_t* out) { *out = round_to_bf16(x); }

// Appends to (candidates, positions) every |a[i]|, i < count, that is at least `threshold` (above it if `strictly`),
// in position order: with AVX2 8 compared at a time, so a block costs about one pass whatever the threshold.
static void collect_candidates(const float* a, int64_t count, float threshold, bool strictly,
                               std::vector<float>& candidates, std::vector<int32_t>& positions) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.0f), bar = _mm256_set1_ps(threshold);
  for (; i + 8 <= count; i += 8) {
    const __m256 magnitude = _mm256_andnot_ps(sign, _mm256_loadu_ps(a + i));
    int mask = _mm256_movemask_ps(strictly ? _mm256_cmp_ps(magnitude, bar, _CMP_GT_OQ)
                                           : _mm256_cmp_ps(magnitude, bar, _CMP_GE_OQ));
    while (mask) {
      const int lane = __builtin_ctz(mask);
      candidates.push_back(std::fabs(a[i + lane]));
      positions.push_back(int32_t(i + lane));
      mask &= mask - 1;
    }
  }
#endif
  for (; i < count; ++i) {
    const float magnitude = std::fabs(a[i]);
    if (strictly ? magnitude > threshold : magnitude >= threshold) {
      candidates.push_back(magnitude);
      positions.push_back(int32_t(i));
    }
  }
}

// The take-th largest of `values` (through `scratch`, so that `values` keep their order).
static float kth_largest(const std::vector<float>& values, int64_t take, std::vector<float>& scratch) {
  scratch.assign(values.begin(), values.end());
  std::nth_element(scratch.begin(), scratch.begin() + (take - 1), scratch.end(), std::greater<float>());
  return scratch[take - 1];
}

// The compressed window's selection (CompressedRows.store), after the error feedback has made the error buffer
// a = e + g: per block of `block` coordinates, the `kept` entries of largest |a| (ties by position) go to slot
// `slot` in ascending position, rounded to T, and the error keeps a minus what was stored. The k-th largest |a| is
// found among candidates above a threshold taken from a sample of the block (a full selection only when the sample
// misjudged), so a block costs about one pass. `size`: the coordinates the window really holds.
template <typename T>
static void compressed_select_impl(at::Tensor& error, at::Tensor& values, at::Tensor& offsets, int64_t slot,
                                   int64_t block, int64_t last_kept, int64_t size) {
  const int64_t blocks = values.size(0), m = values.size(1), kept = values.size(2);
  float* e = error.data_ptr<float>();
  T* v = reinterpret_cast<T*>(values.data_ptr());
  int16_t* o = offsets.data_ptr<int16_t>();
  constexpr int64_t kStride = 32;  // one sample per 32 coordinates
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> sample, candidates, order;
    std::vector<int32_t> positions;
    for (int64_t b = first; b < last; ++b) {
      float* a = e + b * block;
      // The coordinates this block really holds, and its share of them (the last block may hold fewer).
      const int64_t real = std::max<int64_t>(1, std::min(block, size - b * block));
      const int64_t take = b == blocks - 1 ? last_kept : kept;
      // Threshold: the sample's magnitude at twice the expected rank of the take-th largest, so that the candidates
      // above it number about 2·take and include the largest unless the sample misjudged (checked below).
      sample.clear();
      for (int64_t i = 0; i < real; i += kStride) sample.push_back(std::fabs(a[i]));
      const int64_t rank = std::min<int64_t>(sample.size() - 1, 2 * take / kStride + 2);
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
      // A sample mostly zero (a block whose coordinates were rarely touched: word-embedding rows) gives a threshold of
      // 0, above which every coordinate would be a candidate: the non-zero ones are collected instead, and if they
      // are fewer than `take`, the take-th largest |a| is 0.
      const float threshold = sample[rank];
      candidates.clear(); positions.clear();
      collect_candidates(a, real, threshold, threshold == 0.0f, candidates, positions);
      float kth = 0.0f;
      if (static_cast<int64_t>(candidates.size()) < take) {  // every coordinate is a candidate
        const bool misjudged = threshold > 0.0f;
        candidates.clear(); positions.clear();
        collect_candidates(a, real, 0.0f, false, candidates, positions);
        if (misjudged) kth = kth_largest(candidates, take, order);
      } else {
        kth = kth_largest(candidates, take, order);
      }
      int64_t above = 0;
      for (float x : candidates) above += x > kth;
      int64_t ties = take - above, n = 0;
      T* vs = v + (b * m + slot) * kept;
      int16_t* os = o + (b * m + slot) * kept;
      for (size_t c = 0; c < candidates.size() && n < take; ++c) {
        if (candidates[c] > kth || (candidates[c] == kth && ties-- > 0)) {
          const int32_t i = positions[c];
          round_to(a[i], vs + n);
          os[n++] = static_cast<int16_t>(i);
          a[i] -= widen(vs[n - 1]);  // exact: a minus its own rounding
        }
      }
      // The rest of a short last block's storage: zeros at distinct positions past the window's end.
      for (int64_t p = real; n < kept; ++p) { round_to(0.0f, vs + n); os[n++] = static_cast<int16_t>(p); }
    }
  });
}

void compressed_select(at::Tensor error, at::Tensor values, at::Tensor offsets, int64_t slot, int64_t block,
                       int64_t last_kept, int64_t size) {
  if (values.scalar_type() == at::kBFloat16)
    compressed_select_impl<uint16_t>(error, values, offsets, slot, block, last_kept, size);
  else compressed_select_impl<float>(error, values, offsets, slot, block, last_kept, size);
}

at::Tensor compressed_dots(at::Tensor values, at::Tensor offsets, int64_t slot, int64_t block, int64_t filled) {
  return values.scalar_type() == at::kBFloat16
             ? compressed_dots_impl<uint16_t>(values, offsets, slot, block, filled)
             : compressed_dots_impl<float>(values, offsets, slot, block, filled);
}

void compressed_combine(at::Tensor values, at::Tensor offsets, at::Tensor coefficients, at::Tensor result,
                        int64_t block, int64_t filled) {
  if (values.scalar_type() == at::kBFloat16)
    compressed_combine_impl<uint16_t>(values, offsets, coefficients, result, block, filled);
  else compressed_combine_impl<float>(values, offsets, coefficients, result, block, filled);
}
