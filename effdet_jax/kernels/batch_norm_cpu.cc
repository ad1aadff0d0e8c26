// Train-mode batch norm (+ swish) on XLA:CPU through the XLA FFI: the statistics' sums, and the
// backward pass's two sums and input gradient.
//
// Layouts: x, gy, gx [N, H, W, C] float32, row-major; per-channel coefficients [K, C]; sums
// [N, 2, C], per image (the caller sums over N, so that a batch sharded over devices ends in an
// all-reduce).
//   effdet_channel_sums:      s[n, 0, c] = sum_{h, w} x,  s[n, 1, c] = sum_{h, w} x^2
//   effdet_bn_backward_sums:  s[n, 0, c] = sum_{h, w} gz, s[n, 1, c] = sum_{h, w} gz (x - mean)
//   effdet_bn_backward_input: gx = a gz + c1 (x - mean) + c0
//   effdet_bn_swish:          y = swish(z)
// with z = (x - mean) a + bias and gz = gy * swish'(z) (attribute swish = 1) or gz = gy (0);
// coefficients rows (a, mean, bias), and (a, mean, bias, c1, c0) for the input gradient.
//
// Why this exists: XLA:CPU hands each reduction to YNNPACK as its own pass, so the mean and the
// mean square took two passes over every pre-BN activation, and the backward pass five (it
// stored x - mean and gz, then reduced each sum separately); here they take one, and two
// (benchmarks/RESULTS.md). swish'(z) is recomputed from x with a vectorised exp.
//
// Sums: each row is summed in float32 (at most W terms), and row sums are added in double. Every
// image's rows are split into a fixed number of chunks added in chunk order, so the result does
// not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using effdet_cpu::Exp;
using effdet_cpu::Load;
using effdet_cpu::ParallelFor;
using effdet_cpu::ParallelRows;
using effdet_cpu::Splat;
using effdet_cpu::Store;
using effdet_cpu::Load16;
using effdet_cpu::Store16;
using effdet_cpu::v16;
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
      for (; ch + 16 <= s.c; ch += 16) {
        const v16 v = Load16(src + ch);
        Store16(s0 + ch, Load16(s0 + ch) + v);
        Store16(s1 + ch, Load16(s1 + ch) + v * v);
      }
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

// gz = gy * swish'(z) (or gy) for z = centred * a + bias, centred = x - mean: 16 or 8 channels
// (values only, no pointers: a template argument drops the vector typedefs' aligned(4)) and one.
template <bool kSwish, typename V>
inline V GradZ(V centred, V gy, V a, V bias) {
  if (!kSwish) return gy;
  const V z = centred * a + bias;
  const V sig = 1.0f / (1.0f + Exp(-z));
  return gy * (sig * (1.0f + z * (1.0f - sig)));
}

template <bool kSwish>
inline float GradZ(float centred, float gy, float a, float bias) {
  if (!kSwish) return gy;
  const float z = centred * a + bias;
  const float sig = 1.0f / (1.0f + std::exp(-z));
  return gy * (sig * (1.0f + z * (1.0f - sig)));
}

// Runs pixel(p) for every pixel p of [N, H, W], a row of pixels at a time (ParallelRows).
template <typename F>
void ParallelPixels(ffi::ThreadPool& pool, const Shape& s, const F& pixel) {
  ParallelRows(pool, s.n * s.h, [&](int64_t row) {
    for (int64_t p = row * s.w; p < (row + 1) * s.w; ++p) pixel(p);
  });
}

ffi::Error CheckOperands(ffi::Span<const int64_t> x, ffi::Span<const int64_t> gy, ffi::Span<const int64_t> coefs,
                         int64_t rows, Shape* shape) {
  if (x.size() != 4 || gy.size() != 4 || coefs.size() != 2) {
    return ffi::Error::InvalidArgument("batch-norm: x and gy must be [N, H, W, C], coefs [K, C]");
  }
  *shape = Shape{x[0], x[1], x[2], x[3]};
  for (int k = 0; k < 4; ++k) {
    if (gy[k] != x[k]) return ffi::Error::InvalidArgument("batch-norm: gy's shape differs from x's");
  }
  if (coefs[0] != rows || coefs[1] != shape->c) {
    return ffi::Error::InvalidArgument("batch-norm: coefs must be [K, C] with K rows for this kernel");
  }
  return ffi::Error::Success();
}

template <bool kSwish>
void BackwardSums(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* gy, const float* coefs,
                  float* out) {
  const float *a = coefs, *mean = coefs + s.c, *bias = coefs + 2 * s.c;
  auto row_sums = [&](int64_t row, float* __restrict s0, float* __restrict s1) {
    const float* xr = x + row * s.w * s.c;
    const float* gr = gy + row * s.w * s.c;
    for (int64_t j = 0; j < s.w; ++j, xr += s.c, gr += s.c) {
      int64_t ch = 0;
      for (; ch + 16 <= s.c; ch += 16) {
        const v16 centred = Load16(xr + ch) - Load16(mean + ch);
        const v16 gz = GradZ<kSwish>(centred, Load16(gr + ch), Load16(a + ch), Load16(bias + ch));
        Store16(s0 + ch, Load16(s0 + ch) + gz);
        Store16(s1 + ch, Load16(s1 + ch) + gz * centred);
      }
      for (; ch + 8 <= s.c; ch += 8) {
        const v8 centred = Load(xr + ch) - Load(mean + ch);
        const v8 gz = GradZ<kSwish>(centred, Load(gr + ch), Load(a + ch), Load(bias + ch));
        Store(s0 + ch, Load(s0 + ch) + gz);
        Store(s1 + ch, Load(s1 + ch) + gz * centred);
      }
      for (; ch < s.c; ++ch) {
        const float centred = xr[ch] - mean[ch];
        const float gz = GradZ<kSwish>(centred, gr[ch], a[ch], bias[ch]);
        s0[ch] += gz;
        s1[ch] += gz * centred;
      }
    }
  };
  PerImageSums(pool, s, row_sums, out);
}

ffi::Error BnBackwardSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                          ffi::Buffer<ffi::F32> coefs, ffi::ResultBuffer<ffi::F32> sums, int64_t swish) {
  Shape s;
  if (auto e = CheckOperands(x.dimensions(), gy.dimensions(), coefs.dimensions(), 3, &s); e.failure()) return e;
  const auto d = sums->dimensions();
  if (d.size() != 3 || d[0] != s.n || d[1] != 2 || d[2] != s.c) {
    return ffi::Error::InvalidArgument("batch-norm backward: the sums must be [N, 2, C]");
  }
  if (swish) {
    BackwardSums<true>(pool, s, x.typed_data(), gy.typed_data(), coefs.typed_data(), sums->typed_data());
  } else {
    BackwardSums<false>(pool, s, x.typed_data(), gy.typed_data(), coefs.typed_data(), sums->typed_data());
  }
  return ffi::Error::Success();
}

template <bool kSwish>
void BackwardInput(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* gy, const float* coefs,
                   float* gx) {
  const float *a = coefs, *mean = coefs + s.c, *bias = coefs + 2 * s.c, *c1 = coefs + 3 * s.c,
              *c0 = coefs + 4 * s.c;
  ParallelPixels(pool, s, [&](int64_t pixel) {
    const float* xr = x + pixel * s.c;
    const float* gr = gy + pixel * s.c;
    float* out = gx + pixel * s.c;
    int64_t ch = 0;
    for (; ch + 16 <= s.c; ch += 16) {
      const v16 av = Load16(a + ch);
      const v16 centred = Load16(xr + ch) - Load16(mean + ch);
      const v16 gz = GradZ<kSwish>(centred, Load16(gr + ch), av, Load16(bias + ch));
      Store16(out + ch, av * gz + Load16(c1 + ch) * centred + Load16(c0 + ch));
    }
    for (; ch + 8 <= s.c; ch += 8) {
      const v8 av = Load(a + ch);
      const v8 centred = Load(xr + ch) - Load(mean + ch);
      const v8 gz = GradZ<kSwish>(centred, Load(gr + ch), av, Load(bias + ch));
      Store(out + ch, av * gz + Load(c1 + ch) * centred + Load(c0 + ch));
    }
    for (; ch < s.c; ++ch) {
      const float centred = xr[ch] - mean[ch];
      const float gz = GradZ<kSwish>(centred, gr[ch], a[ch], bias[ch]);
      out[ch] = a[ch] * gz + c1[ch] * centred + c0[ch];
    }
  });
}

ffi::Error BnBackwardInput(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                           ffi::Buffer<ffi::F32> coefs, ffi::ResultBuffer<ffi::F32> gx, int64_t swish) {
  Shape s;
  if (auto e = CheckOperands(x.dimensions(), gy.dimensions(), coefs.dimensions(), 5, &s); e.failure()) return e;
  if (gx->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("batch-norm backward: gx must have x's shape");
  }
  if (swish) {
    BackwardInput<true>(pool, s, x.typed_data(), gy.typed_data(), coefs.typed_data(), gx->typed_data());
  } else {
    BackwardInput<false>(pool, s, x.typed_data(), gy.typed_data(), coefs.typed_data(), gx->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error BnSwish(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> coefs,
                   ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  // x stands in for gy, which this kernel does not take.
  if (auto e = CheckOperands(x.dimensions(), x.dimensions(), coefs.dimensions(), 3, &s); e.failure()) return e;
  if (y->element_count() != x.element_count()) return ffi::Error::InvalidArgument("batch-norm: y must have x's shape");
  const float* xp = x.typed_data();
  const float *a = coefs.typed_data(), *mean = a + s.c, *bias = a + 2 * s.c;
  float* yp = y->typed_data();
  ParallelPixels(pool, s, [&](int64_t p) {
    const float* xr = xp + p * s.c;
    float* out = yp + p * s.c;
    int64_t ch = 0;
    for (; ch + 16 <= s.c; ch += 16) {
      const v16 z = (Load16(xr + ch) - Load16(mean + ch)) * Load16(a + ch) + Load16(bias + ch);
      Store16(out + ch, z / (1.0f + Exp(-z)));
    }
    for (; ch + 8 <= s.c; ch += 8) {
      const v8 z = (Load(xr + ch) - Load(mean + ch)) * Load(a + ch) + Load(bias + ch);
      Store(out + ch, z / (Splat(1.0f) + Exp(-z)));
    }
    for (; ch < s.c; ++ch) {
      const float z = (xr[ch] - mean[ch]) * a[ch] + bias[ch];
      out[ch] = z / (1.0f + std::exp(-z));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define EFFDET_BN_BACKWARD_BINDING    \
  ffi::Ffi::Bind()                    \
      .Ctx<ffi::ThreadPool>()         \
      .Arg<ffi::Buffer<ffi::F32>>()   \
      .Arg<ffi::Buffer<ffi::F32>>()   \
      .Arg<ffi::Buffer<ffi::F32>>()   \
      .Ret<ffi::Buffer<ffi::F32>>()   \
      .Attr<int64_t>("swish")

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBnBackwardSums, BnBackwardSums, EFFDET_BN_BACKWARD_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBnBackwardInput, BnBackwardInput, EFFDET_BN_BACKWARD_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBnSwish, BnSwish,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
