// Per-image channel sums for the statistics of train-mode batch norm on XLA:CPU, through the XLA FFI.
//
// Layouts: x [N, H, W, C] float32, row-major; result s [N, 2, C] float32 with
//   s[n, 0, c] = sum_{h, w} x[n, h, w, c],  s[n, 1, c] = sum_{h, w} x[n, h, w, c]^2
// (per image: the caller sums over N, so that a batch sharded over devices ends in an all-reduce).
//
// Why this exists: XLA:CPU hands each reduction to YNNPACK as its own pass, so the mean and the
// mean square took two passes over every pre-BN activation; here they take one
// (benchmarks/RESULTS.md). (A kernel for the backward pass's two sums, recomputing the swish
// derivative, was tried and measured slower in the train step than XLA's fusions: dropped.)
//
// Sums: each row is summed in float32 (at most W terms), and row sums are added in double. Every
// image's rows are split into a fixed number of chunks added in chunk order, so the result does
// not depend on the number of threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using effdet_cpu::Load;
using effdet_cpu::ParallelFor;
using effdet_cpu::Store;
using effdet_cpu::v8;

namespace {

// Rows of each image are split into this many chunks (fewer for short images).
constexpr int64_t kChunks = 8;

struct Shape {
  int64_t n, h, w, c;
};

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> s, Shape* shape) {
  if (x.size() != 4 || s.size() != 3) {
    return ffi::Error::InvalidArgument("batch-norm sums: x must be [N, H, W, C] and the sums [N, 2, C]");
  }
  *shape = Shape{x[0], x[1], x[2], x[3]};
  if (s[0] != shape->n || s[1] != 2 || s[2] != shape->c) {
    return ffi::Error::InvalidArgument("batch-norm sums: the sums must be [N, 2, C] for x [N, H, W, C]");
  }
  return ffi::Error::Success();
}

// Runs row_sums(row, sum0, sum1) (float32 sums of one row, arrays of C zeros on entry) for every
// row of every image, and writes the per-image totals into out [N, 2, C].
template <typename RowSums>
void PerImageSums(ffi::ThreadPool& pool, const Shape& s, const RowSums& row_sums, float* out) {
  const int64_t chunks = std::max<int64_t>(1, std::min(s.h, kChunks));
  std::vector<double> partial(s.n * chunks * 2 * s.c, 0.0);
  ParallelFor(pool, s.n * chunks, [&](int64_t task) {
    const int64_t n = task / chunks, chunk = task % chunks;
    double* acc = partial.data() + task * 2 * s.c;
    std::vector<float> row(2 * s.c);
    for (int64_t i = chunk * s.h / chunks; i < (chunk + 1) * s.h / chunks; ++i) {
      std::fill(row.begin(), row.end(), 0.f);
      row_sums(n * s.h + i, row.data(), row.data() + s.c);
      for (int64_t k = 0; k < 2 * s.c; ++k) acc[k] += row[k];
    }
  });
  for (int64_t n = 0; n < s.n; ++n) {
    const double* p = partial.data() + n * chunks * 2 * s.c;
    for (int64_t k = 0; k < 2 * s.c; ++k) {
      double total = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) total += p[chunk * 2 * s.c + k];
      out[n * 2 * s.c + k] = static_cast<float>(total);
    }
  }
}

ffi::Error ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> sums) {
  Shape s;
  if (auto e = CheckShapes(x.dimensions(), sums->dimensions(), &s); e.failure()) return e;
  const float* xp = x.typed_data();
  auto row_sums = [&](int64_t row, float* __restrict s0, float* __restrict s1) {
    const float* src = xp + row * s.w * s.c;
    for (int64_t j = 0; j < s.w; ++j, src += s.c) {
      int64_t ch = 0;
      for (; ch + 8 <= s.c; ch += 8) {
        const v8 v = Load(src + ch);
        Store(s0 + ch, Load(s0 + ch) + v);
        Store(s1 + ch, Load(s1 + ch) + v * v);
      }
      for (; ch < s.c; ++ch) {
        s0[ch] += src[ch];
        s1[ch] += src[ch] * src[ch];
      }
    }
  };
  PerImageSums(pool, s, row_sums, sums->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
