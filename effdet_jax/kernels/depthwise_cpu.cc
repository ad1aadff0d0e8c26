// Depthwise convolution for XLA:CPU through the XLA FFI: forward, input gradient and kernel
// gradient, each one pass over its tensors.
//
// Layouts: x [N, H, W, C], kernel [KH, KW, 1, C], y / g [N, OH, OW, C], all float32, row-major.
// Geometry follows TF "SAME" with explicit pads: y[n, i, j, c] = sum_{a, b}
//   x[n, i*s + a*d - pad_top, j*s + b*d - pad_left, c] * kernel[a, b, 0, c], zero outside x.
//
// Why this exists: XLA:CPU lowers the shift-and-add depthwise formulation to one strided slice
// fusion per tap, and its kernel gradient to a multiply and a reduction over the major axes;
// together they are a large share of the EfficientDet-D0 train step (benchmarks/RESULTS.md). Here each
// output vector of 16 channels (then 8, then single channels) is accumulated in a register over
// all taps; 16-float vectors are one AVX-512 register where the CPU has them. Where every tap lies
// inside x (all but the border columns) and the geometry is one EfficientDet uses (3x3 or 5x5,
// dilation 1, channels a multiple of 8), templated paths keep the weights in registers and
// compute several outputs per pass (forward; input gradient at stride 1, which is a forward
// correlation with the turned kernel) or keep independent sums per tap (kernel gradient); the
// general loops handle the rest.
//
// Threads: work is split into rows (or fixed row chunks for the kernel gradient) taken from an
// atomic counter by the calling thread and by helpers on XLA's intra-op thread pool. Results do
// not depend on the number of threads: every output element is summed in a fixed order, and the
// kernel gradient's per-chunk partial sums are added in chunk order.
//
// Size: the three kernels share the templated interior blocks and must be compiled in one
// translation unit for GCC to inline them (a block called out of line gains nothing), which is
// why this file is longer than the project's other modules.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using effdet_cpu::Load;
using effdet_cpu::LoadV;
using effdet_cpu::ParallelFor;
using effdet_cpu::ParallelRows;
using effdet_cpu::Store;
using effdet_cpu::StoreV;
using effdet_cpu::v16;
using effdet_cpu::v8;

namespace {

struct Geometry {
  int64_t n, h, w, c;  // input
  int64_t oh, ow;      // output
  int64_t kh, kw, stride, dilation, pad_top, pad_left;
};

// First and one-past-last output column j with 0 <= j*s + offset < width (kernel gradient).
inline void ValidColumns(int64_t offset, int64_t stride, int64_t width, int64_t out_w, int64_t* begin,
                         int64_t* end) {
  *begin = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  *end = width - 1 - offset < 0 ? 0 : std::min(out_w, (width - 1 - offset) / stride + 1);
  if (*end < *begin) *end = *begin;
}

// Taps are at most kMaxTaps per axis (EfficientDet uses 3 and 5).
constexpr int64_t kMaxTaps = 16;

// One block of 16 or 8 channels of AccumulateTaps.
template <typename V>
__attribute__((always_inline)) inline void AccumulateTapsBlock(
    int64_t c, int rows, const float* const* src_rows, const int64_t* row_tap, int cols, const int64_t* col_offset,
    const int64_t* col_tap, int64_t kw, const float* k, float* __restrict out, int64_t ch) {
  V acc = {};
  for (int r = 0; r < rows; ++r) {
    const float* src = src_rows[r] + ch;
    const float* wrow = k + row_tap[r] * kw * c + ch;
    for (int q = 0; q < cols; ++q) acc += LoadV<V>(src + col_offset[q]) * LoadV<V>(wrow + col_tap[q] * c);
  }
  StoreV<V>(out + ch, acc);
}

// Accumulates, for each block of 16 (then 8) channels of one output vector, the products of `rows` x `cols`
// tap pairs in a register: out[ch] = sum_{r, q} src[r][q][ch] * weights[r][q][ch].
inline void AccumulateTaps(int64_t c, int rows, const float* const* src_rows, const int64_t* row_tap,
                           int cols, const int64_t* col_offset, const int64_t* col_tap, int64_t kw,
                           const float* k, float* __restrict out) {
  int64_t ch = 0;
  for (; ch + 16 <= c; ch += 16) {
    AccumulateTapsBlock<v16>(c, rows, src_rows, row_tap, cols, col_offset, col_tap, kw, k, out, ch);
  }
  for (; ch + 8 <= c; ch += 8) {
    AccumulateTapsBlock<v8>(c, rows, src_rows, row_tap, cols, col_offset, col_tap, kw, k, out, ch);
  }
  for (; ch < c; ++ch) {
    float acc = 0.f;
    for (int r = 0; r < rows; ++r) {
      for (int q = 0; q < cols; ++q) {
        acc += src_rows[r][col_offset[q] + ch] * k[(row_tap[r] * kw + col_tap[q]) * c + ch];
      }
    }
    out[ch] = acc;
  }
}

constexpr int kInteriorOutputs = 4;

// kInteriorOutputs neighbouring outputs from column j, for one block of 16 or 8 channels.
template <int KW, int S, typename V>
__attribute__((always_inline)) inline void ForwardInteriorBlock(const Geometry& g, int rows,
    const float* const* src_rows, const int64_t* row_tap, const float* k, float* yrow, int64_t j, int64_t ch) {
  const int64_t c = g.c;
  V acc[kInteriorOutputs];
  for (int t = 0; t < kInteriorOutputs; ++t) acc[t] = V{};
  for (int r = 0; r < rows; ++r) {
    const float* wrow = k + row_tap[r] * KW * c + ch;
    V w[KW];
    for (int b = 0; b < KW; ++b) w[b] = LoadV<V>(wrow + b * c);
    const float* src = src_rows[r] + (j * S - g.pad_left) * c + ch;
    for (int t = 0; t < kInteriorOutputs; ++t) {
      for (int b = 0; b < KW; ++b) acc[t] += LoadV<V>(src + (t * S + b) * c) * w[b];
    }
  }
  for (int t = 0; t < kInteriorOutputs; ++t) StoreV<V>(yrow + (j + t) * c + ch, acc[t]);
}

// Interior output columns [begin, end) of one output row, where all KW taps of every tap row lie
// inside x (dilation 1, channels a multiple of 8). Four neighbouring outputs are computed together
// with the tap row's KW weight vectors held in registers, so each loaded input vector serves
// several outputs; each output sums its taps in AccumulateTaps' order (tap rows, then taps left
// to right). Returns the first column not done (the caller finishes a remainder of fewer than
// four).
template <int KW, int S>
int64_t ForwardInterior(const Geometry& g, int rows, const float* const* src_rows, const int64_t* row_tap,
                        const float* k, float* yrow, int64_t begin, int64_t end) {
  const int64_t c = g.c;
  int64_t j = begin;
  for (; j + kInteriorOutputs <= end; j += kInteriorOutputs) {
    int64_t ch = 0;
    for (; ch + 16 <= c; ch += 16) ForwardInteriorBlock<KW, S, v16>(g, rows, src_rows, row_tap, k, yrow, j, ch);
    for (; ch < c; ch += 8) ForwardInteriorBlock<KW, S, v8>(g, rows, src_rows, row_tap, k, yrow, j, ch);
  }
  return j;
}

using InteriorFn = int64_t (*)(const Geometry&, int, const float* const*, const int64_t*, const float*,
                               float*, int64_t, int64_t);

// The interior routine for this geometry, or nullptr where only the general path applies.
InteriorFn ForwardInteriorFor(const Geometry& g) {
  if (g.dilation != 1 || g.c % 8 != 0 || g.pad_left < 0) return nullptr;
  if (g.kw == 3 && g.stride == 1) return ForwardInterior<3, 1>;
  if (g.kw == 5 && g.stride == 1) return ForwardInterior<5, 1>;
  if (g.kw == 5 && g.stride == 2) return ForwardInterior<5, 2>;
  return nullptr;
}

// y row (n, i): y[n, i, j, :] = sum over taps (a, b) inside x of x[n, i*s + a*d - pt, j*s + b*d - pl, :]
// * k[a, b, 0, :].
void ForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t row, InteriorFn interior) {
  const int64_t n = row / g.oh, i = row % g.oh, c = g.c;
  const float* src_rows[kMaxTaps];
  int64_t row_tap[kMaxTaps], col_offset[kMaxTaps], col_tap[kMaxTaps];
  int rows = 0;
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t iy = i * g.stride + a * g.dilation - g.pad_top;
    if (iy < 0 || iy >= g.h) continue;
    src_rows[rows] = x + (n * g.h + iy) * g.w * c;
    row_tap[rows++] = a;
  }
  float* yrow = y + row * g.ow * c;
  auto general = [&](int64_t j) {
    int cols = 0;
    for (int64_t b = 0; b < g.kw; ++b) {
      const int64_t ix = j * g.stride + b * g.dilation - g.pad_left;
      if (ix < 0 || ix >= g.w) continue;
      col_offset[cols] = ix * c;
      col_tap[cols++] = b;
    }
    AccumulateTaps(c, rows, src_rows, row_tap, cols, col_offset, col_tap, g.kw, k, yrow + j * c);
  };
  if (interior == nullptr) {
    for (int64_t j = 0; j < g.ow; ++j) general(j);
    return;
  }
  // Columns whose taps all lie inside x: j*s >= pl and j*s + (kw-1) - pl <= w-1 (dilation 1).
  const int64_t begin = std::min(g.ow, (g.pad_left + g.stride - 1) / g.stride);
  const int64_t last = g.w - 1 + g.pad_left - (g.kw - 1);
  const int64_t end = last < 0 ? begin : std::max(begin, std::min(g.ow, last / g.stride + 1));
  for (int64_t j = 0; j < begin; ++j) general(j);
  for (int64_t j = interior(g, rows, src_rows, row_tap, k, yrow, begin, end); j < g.ow; ++j) general(j);
}

// dx row (n, u): dx[n, u, v, :] = sum over taps (a, b) and output pixels (i, j) with
// i*s + a*d - pt = u and j*s + b*d - pl = v of g[n, i, j, :] * k[a, b, 0, :].
void InputGradRow(const Geometry& g, const float* dy, const float* k, float* dx, int64_t row) {
  const int64_t n = row / g.h, u = row % g.h, c = g.c;
  const float* src_rows[kMaxTaps];
  int64_t row_tap[kMaxTaps], col_offset[kMaxTaps], col_tap[kMaxTaps];
  int rows = 0;
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t num = u + g.pad_top - a * g.dilation;
    if (num < 0 || num % g.stride != 0 || num / g.stride >= g.oh) continue;
    src_rows[rows] = dy + (n * g.oh + num / g.stride) * g.ow * c;
    row_tap[rows++] = a;
  }
  float* dxrow = dx + row * g.w * c;
  for (int64_t v = 0; v < g.w; ++v) {
    int cols = 0;
    for (int64_t b = 0; b < g.kw; ++b) {
      const int64_t num = v + g.pad_left - b * g.dilation;
      if (num < 0 || num % g.stride != 0 || num / g.stride >= g.ow) continue;
      col_offset[cols] = (num / g.stride) * c;
      col_tap[cols++] = b;
    }
    AccumulateTaps(c, rows, src_rows, row_tap, cols, col_offset, col_tap, g.kw, k, dxrow + v * c);
  }
}

// Adds sum_{j} x[n, i*s + a*d - pad_top, j*s + b*d - pad_left, :] * g[n, i, j, :] to
// partial[a, b, :] for one output row.
void KernelGradRow(const Geometry& g, const float* x, const float* dy, float* partial, int64_t row) {
  const int64_t n = row / g.oh, i = row % g.oh, c = g.c;
  const float* grow = dy + row * g.ow * c;
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t iy = i * g.stride + a * g.dilation - g.pad_top;
    if (iy < 0 || iy >= g.h) continue;
    const float* xrow = x + (n * g.h + iy) * g.w * c;
    for (int64_t b = 0; b < g.kw; ++b) {
      const int64_t offset = b * g.dilation - g.pad_left;
      int64_t j0, j1;
      ValidColumns(offset, g.stride, g.w, g.ow, &j0, &j1);
      float* acc = partial + (a * g.kw + b) * c;
      int64_t ch = 0;
      for (; ch + 8 <= c; ch += 8) {
        v8 sum = Load(acc + ch);
        for (int64_t j = j0; j < j1; ++j) {
          sum += Load(xrow + (j * g.stride + offset) * c + ch) * Load(grow + j * c + ch);
        }
        Store(acc + ch, sum);
      }
      for (; ch < c; ++ch) {
        float sum = acc[ch];
        for (int64_t j = j0; j < j1; ++j) sum += xrow[(j * g.stride + offset) * c + ch] * grow[j * c + ch];
        acc[ch] = sum;
      }
    }
  }
}

// One tap row's KW sums for one block of 16 or 8 channels (KernelGradRowFast).
template <int KW, int S, typename V>
__attribute__((always_inline)) inline void KernelGradBlock(const Geometry& g, const float* xrow, const float* grow,
                                                           float* acc, const int64_t* first, const int64_t* stop,
                                                           int64_t lo, int64_t hi, int64_t ch) {
  const int64_t c = g.c;
  V even[KW], odd[KW];
  for (int b = 0; b < KW; ++b) even[b] = odd[b] = V{};
  int64_t j = lo;
  for (; j + 2 <= hi; j += 2) {
    const V g0 = LoadV<V>(grow + j * c + ch), g1 = LoadV<V>(grow + (j + 1) * c + ch);
    const float* src = xrow + (j * S - g.pad_left) * c + ch;  // column j*S - pl, valid for j >= lo
    for (int b = 0; b < KW; ++b) {
      even[b] += LoadV<V>(src + b * c) * g0;
      odd[b] += LoadV<V>(src + (S + b) * c) * g1;
    }
  }
  for (int b = 0; b < KW; ++b) {
    V sum = LoadV<V>(acc + b * c + ch) + (even[b] + odd[b]);
    auto add = [&](int64_t j0, int64_t j1) {  // border columns, where tap b alone may be valid
      for (int64_t jj = j0; jj < j1; ++jj) {
        sum += LoadV<V>(xrow + (jj * S + b - g.pad_left) * c + ch) * LoadV<V>(grow + jj * c + ch);
      }
    };
    add(first[b], std::min(lo, stop[b]));
    add(std::max(j, first[b]), stop[b]);
    StoreV<V>(acc + b * c + ch, sum);
  }
}

// KernelGradRow for dilation 1 and channels a multiple of 8: per tap row, the KW taps' sums
// for two neighbouring output columns are kept in 2 * KW registers, so no add waits on the
// previous one (the general loop is one dependent chain per tap).
template <int KW, int S>
void KernelGradRowFast(const Geometry& g, const float* x, const float* dy, float* partial, int64_t row) {
  const int64_t n = row / g.oh, i = row % g.oh, c = g.c;
  const float* grow = dy + row * g.ow * c;
  int64_t first[KW], stop[KW];  // valid output columns [first, stop) per tap
  int64_t lo = 0, hi = g.ow;    // columns valid for every tap
  for (int b = 0; b < KW; ++b) {
    ValidColumns(b - g.pad_left, S, g.w, g.ow, &first[b], &stop[b]);
    lo = std::max(lo, first[b]);
    hi = std::min(hi, stop[b]);
  }
  if (hi < lo) hi = lo;
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t iy = i * S + a - g.pad_top;
    if (iy < 0 || iy >= g.h) continue;
    const float* xrow = x + (n * g.h + iy) * g.w * c;
    float* acc = partial + a * KW * c;
    int64_t ch = 0;
    for (; ch + 16 <= c; ch += 16) KernelGradBlock<KW, S, v16>(g, xrow, grow, acc, first, stop, lo, hi, ch);
    for (; ch < c; ch += 8) KernelGradBlock<KW, S, v8>(g, xrow, grow, acc, first, stop, lo, hi, ch);
  }
}

using KernelGradRowFn = void (*)(const Geometry&, const float*, const float*, float*, int64_t);

KernelGradRowFn KernelGradRowFor(const Geometry& g) {
  if (g.dilation == 1 && g.c % 8 == 0) {
    if (g.kw == 3 && g.stride == 1) return KernelGradRowFast<3, 1>;
    if (g.kw == 3 && g.stride == 2) return KernelGradRowFast<3, 2>;
    if (g.kw == 5 && g.stride == 1) return KernelGradRowFast<5, 1>;
    if (g.kw == 5 && g.stride == 2) return KernelGradRowFast<5, 2>;
  }
  return KernelGradRow;
}

ffi::Error MakeGeometry(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> k_dims,
                        ffi::Span<const int64_t> y_dims, int64_t stride, int64_t dilation,
                        int64_t pad_top, int64_t pad_left, Geometry* g) {
  if (x_dims.size() != 4 || k_dims.size() != 4 || y_dims.size() != 4) {
    return ffi::Error::InvalidArgument("depthwise: x, kernel and y must have rank 4");
  }
  *g = Geometry{x_dims[0], x_dims[1], x_dims[2], x_dims[3], y_dims[1], y_dims[2],
                k_dims[0], k_dims[1], stride, dilation, pad_top, pad_left};
  if (k_dims[2] != 1 || k_dims[3] != g->c || y_dims[0] != g->n || y_dims[3] != g->c) {
    return ffi::Error::InvalidArgument("depthwise: shapes of x, kernel and y do not agree");
  }
  if (stride < 1 || dilation < 1) return ffi::Error::InvalidArgument("depthwise: bad stride");
  if (g->kh > kMaxTaps || g->kw > kMaxTaps) {
    return ffi::Error::InvalidArgument("depthwise: kernels up to 16 x 16 are supported");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t dilation, int64_t pad_top,
                   int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride, dilation,
                            pad_top, pad_left, &g);
      e.failure()) {
    return e;
  }
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  const InteriorFn interior = ForwardInteriorFor(g);
  ParallelRows(pool, g.n * g.oh, [&](int64_t row) { ForwardRow(g, xp, kp, yp, row, interior); });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t dilation, int64_t pad_top,
                     int64_t pad_left) {
  Geometry g;
  if (auto e = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride, dilation,
                            pad_top, pad_left, &g);
      e.failure()) {
    return e;
  }
  const float* gp = dy.typed_data();
  const float* kp = kernel.typed_data();
  float* xp = dx->typed_data();
  if (g.stride == 1) {
    // With stride 1 the input gradient is the forward correlation of dy with the kernel turned
    // by 180 degrees and the complementary padding, so it takes the forward's fast path.
    const Geometry flipped{g.n, g.oh, g.ow, g.c, g.h, g.w, g.kh, g.kw, 1, g.dilation,
                           (g.kh - 1) * g.dilation - g.pad_top, (g.kw - 1) * g.dilation - g.pad_left};
    std::vector<float> turned(g.kh * g.kw * g.c);
    for (int64_t a = 0; a < g.kh; ++a) {
      for (int64_t b = 0; b < g.kw; ++b) {
        std::memcpy(turned.data() + (a * g.kw + b) * g.c, kp + ((g.kh - 1 - a) * g.kw + g.kw - 1 - b) * g.c,
                    sizeof(float) * g.c);
      }
    }
    const InteriorFn interior = ForwardInteriorFor(flipped);
    ParallelRows(pool, g.n * g.h,
                [&](int64_t row) { ForwardRow(flipped, gp, turned.data(), xp, row, interior); });
    return ffi::Error::Success();
  }
  ParallelRows(pool, g.n * g.h, [&](int64_t row) { InputGradRow(g, gp, kp, xp, row); });
  return ffi::Error::Success();
}

// Each image's output rows are split into a fixed number of chunks (not one per thread) so that
// the sum, and so the result, is the same whatever the thread count. The result is per image,
// dk [N, KH, KW, C]; the caller sums it over the batch (in XLA, so that a batch sharded over
// devices ends in the usual gradient all-reduce).
constexpr int64_t kKernelGradChunks = 8;

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t dilation, int64_t pad_top,
                      int64_t pad_left) {
  const auto k_dims = dk->dimensions();
  if (k_dims.size() != 4) return ffi::Error::InvalidArgument("depthwise: dk must be [N, KH, KW, C]");
  const int64_t kernel_dims[4] = {k_dims[1], k_dims[2], 1, k_dims[3]};
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), ffi::Span<const int64_t>(kernel_dims, 4), dy.dimensions(),
                            stride, dilation, pad_top, pad_left, &g);
      e.failure()) {
    return e;
  }
  if (k_dims[0] != g.n) return ffi::Error::InvalidArgument("depthwise: dk batch differs from x");
  const int64_t chunks = std::max<int64_t>(1, std::min(g.oh, kKernelGradChunks));
  const int64_t taps = g.kh * g.kw * g.c;
  std::vector<float> partial(g.n * chunks * taps, 0.f);
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  const KernelGradRowFn row_fn = KernelGradRowFor(g);
  ParallelFor(pool, g.n * chunks, [&](int64_t task) {
    const int64_t n = task / chunks, chunk = task % chunks;
    float* acc = partial.data() + task * taps;
    for (int64_t i = chunk * g.oh / chunks; i < (chunk + 1) * g.oh / chunks; ++i) {
      row_fn(g, xp, gp, acc, n * g.oh + i);
    }
  });
  float* out = dk->typed_data();
  for (int64_t n = 0; n < g.n; ++n) {
    float* o = out + n * taps;
    const float* p = partial.data() + n * chunks * taps;
    std::memcpy(o, p, sizeof(float) * taps);
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      for (int64_t t = 0; t < taps; ++t) o[t] += p[chunk * taps + t];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// The three handlers share one signature: two float32 operands, one result, four attributes.
#define EFFDET_DEPTHWISE_BINDING \
  ffi::Ffi::Bind()               \
      .Ctx<ffi::ThreadPool>()    \
      .Arg<ffi::Buffer<ffi::F32>>() \
      .Arg<ffi::Buffer<ffi::F32>>() \
      .Ret<ffi::Buffer<ffi::F32>>() \
      .Attr<int64_t>("stride")   \
      .Attr<int64_t>("dilation") \
      .Attr<int64_t>("pad_top")  \
      .Attr<int64_t>("pad_left")

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetDepthwiseForward, Forward, EFFDET_DEPTHWISE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetDepthwiseInputGrad, InputGrad, EFFDET_DEPTHWISE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetDepthwiseKernelGrad, KernelGrad, EFFDET_DEPTHWISE_BINDING);
