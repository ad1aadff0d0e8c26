// Shared by the XLA:CPU FFI kernels: 8- and 16-float vector types, exp of them, and ParallelFor /
// ParallelRows over XLA's intra-op thread pool.

#ifndef EFFDET_JAX_KERNELS_CPU_COMMON_H_
#define EFFDET_JAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace effdet_cpu {

namespace ffi = xla::ffi;

// An unaligned 8-float vector (GCC / Clang vector extension); compiles to AVX loads and FMAs
// with -mavx2 -mfma, and to pairs of SSE operations otherwise.
typedef float v8 __attribute__((vector_size(32), aligned(4)));

inline v8 Load(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void Store(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }

typedef int32_t v8i __attribute__((vector_size(32)));

// 16 floats: one AVX-512 register where the CPU has them (-march=native), two AVX ones otherwise.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16 Load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void Store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// Loads and stores for code templated on the vector type: through memcpy, because a template
// argument drops the typedefs' aligned(4), and a dereference would then assume natural alignment.
// always_inline: as a per-block call (with vzeroupper) the depthwise 16-wide paths gained nothing.
template <typename V>
__attribute__((always_inline)) inline V LoadV(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void StoreV(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

inline v8 Splat(float f) { return v8{f, f, f, f, f, f, f, f}; }

template <typename V>
struct IntVector;
template <>
struct IntVector<v8> {
  typedef v8i type;
};
template <>
struct IntVector<v16> {
  typedef v16i type;
};

// exp of 8 or 16 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), exp(r) by a
// degree-7 Taylor-like polynomial (Cephes' expf coefficients), times 2^n built in the exponent
// bits. Relative error below 2e-7 where the result is a normal float; x is clamped to
// [-87.3, 88.3].
template <typename V>
inline V Exp(V x) {
  const V zero = {};
  const V lo = zero - 87.3f, hi = zero + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  typedef typename IntVector<V>::type VI;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  return p * reinterpret_cast<const V&>(bits);
}

// Runs body(0) .. body(count - 1) on the calling thread and on helpers from XLA's pool. The
// caller waits for tasks that helpers have claimed; a helper that starts after all tasks are
// claimed touches only the shared counters, never `body`. Caller and helpers together are at most
// the pool's size: the caller is often not a pool thread (XLA runs thunks on the thread that
// called Execute), and with one worker more than cores a preempted worker holds its task for a
// whole time slice, which makes small calls bimodal (benchmarks/RESULTS.md).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, const F& body) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, count - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* fn = &body;
  auto work = [state, count, fn]() {
    for (int64_t i = state->next.fetch_add(1); i < count; i = state->next.fetch_add(1)) {
      (*fn)(i);
      if (state->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == count; });
}

// Runs row(0) .. row(count - 1) in tasks of up to 8 consecutive rows: a thread that computes
// output row i next computes row i + 1, whose input rows it mostly has in its cache already.
// Small maps get one row per task, so that every thread still has work.
template <typename F>
void ParallelRows(ffi::ThreadPool& pool, int64_t count, const F& row) {
  const int64_t per_task = std::clamp<int64_t>(count / 16, 1, 8);
  const int64_t tasks = (count + per_task - 1) / per_task;
  ParallelFor(pool, tasks, [&](int64_t task) {
    for (int64_t r = task * per_task; r < std::min(count, (task + 1) * per_task); ++r) row(r);
  });
}

}  // namespace effdet_cpu

#endif  // EFFDET_JAX_KERNELS_CPU_COMMON_H_
