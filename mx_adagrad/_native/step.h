// The arithmetic of the AdaGrad steps, shared by the dense one-pass kernel (adagrad.cc) and the
// sparse one (sparse_step.cc): MXNet 2.0's element-wise step and the row-wise step. See adagrad.cc
// for what it matches and how.

#ifndef MX_ADAGRAD_NATIVE_STEP_H_
#define MX_ADAGRAD_NATIVE_STEP_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace mx_adagrad {

namespace ffi = xla::ffi;

// jnp.clip(g, -c, c) = minimum(maximum(g, -c), c), with NaN propagating as in XLA.
inline float Clip(float g, float c) {
  g = g < -c ? -c : g;
  return g > c ? c : g;
}

struct Hyper {
  float rescale;
  float clip;  // +inf when there is no clipping: clamping to +-inf is the identity, NaN included
  float epsilon;
};

// a * b + c as XLA CPU computes a contracted multiply-add: one rounding where the CPU has FMA.
inline float Fma(float a, float b, float c) {
#ifdef FP_FAST_FMAF
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The decayed, clipped, rescaled gradient, contracted as XLA contracts it (see the top).
template <bool kRescaleFma>
inline float Decayed(float grad, float weight, const Hyper& hp, float wd) {
  if constexpr (kRescaleFma) {
    return Fma(grad, hp.rescale, wd * weight);
  } else {
    return Fma(wd, weight, Clip(grad * hp.rescale, hp.clip));
  }
}

struct Leaf {
  void* weight;
  const void* grad;
  float* master;  // nullptr without multi_precision
  float* history;
  int64_t size;
  float neg_lr;
  float wd;
};

struct Float32 {
  static constexpr ffi::DataType kType = ffi::DataType::F32;
  static constexpr bool kMaster = false;
  using Storage = float;
};

inline float Bf16ToF32(uint16_t x) {
  uint32_t bits = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as XLA's convert; NaN stays a (quiet) NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

struct BFloat16 {
  static constexpr ffi::DataType kType = ffi::DataType::BF16;
  static constexpr bool kMaster = true;
  using Storage = uint16_t;
  static float ToF32(uint16_t x) { return Bf16ToF32(x); }
  static uint16_t FromF32(float f) { return F32ToBf16(f); }
};

struct Float16 {
  static constexpr ffi::DataType kType = ffi::DataType::F16;
  static constexpr bool kMaster = true;
  using Storage = uint16_t;
  static float ToF32(uint16_t x) {
    _Float16 h;
    std::memcpy(&h, &x, sizeof h);
    return static_cast<float>(h);
  }
  static uint16_t FromF32(float f) {
    _Float16 h = static_cast<_Float16>(f);
    uint16_t x;
    std::memcpy(&x, &h, sizeof x);
    return x;
  }
};

// The new weight, w + q * neg_lr: one rounding where the optax form's XLA fusion contracts it
// (kFused: the dense step), two where apply_updates adds the update in a kernel of its own (the
// scatter-add of a sparse step).
template <bool kFused>
inline float Apply(float q, float neg_lr, float w) {
  if constexpr (kFused) {
    return Fma(q, neg_lr, w);
  } else {
    return w + q * neg_lr;
  }
}

// The gradient a step sees: clipped, rescaled and (kDecay) decayed. Without kDecay there is no
// decay term at all, as in the optax form of a sparse step whose weight decay is a concrete 0
// (which never reads the weight).
template <bool kRescaleFma, bool kDecay>
inline float Gradient(float grad, float weight, const Hyper& hp, float wd) {
  if constexpr (kDecay) {
    return Decayed<kRescaleFma>(grad, weight, hp, wd);
  } else {
    return Clip(grad * hp.rescale, hp.clip);
  }
}

// One row of the element-wise step: weight, gradient and history rows of `width` elements.
template <bool kRescaleFma, bool kDecay, bool kFused>
void ElementwiseRow(float* __restrict w, const float* __restrict g, float* __restrict h,
                    int64_t width, const Hyper& hp, float neg_lr, float wd) {
  for (int64_t e = 0; e < width; ++e) {
    const float ge = Gradient<kRescaleFma, kDecay>(g[e], w[e], hp, wd);
    const float he = Fma(ge, ge, h[e]);
    h[e] = he;
    w[e] = Apply<kFused>(ge / (std::sqrt(he) + hp.epsilon), neg_lr, w[e]);
  }
}

// Elements [begin, end) of one float32 leaf.
template <bool kRescaleFma>
void StepRange(Float32, const Leaf& leaf, const Hyper& hp, int64_t begin, int64_t end) {
  ElementwiseRow<kRescaleFma, true, true>(
      static_cast<float*>(leaf.weight) + begin, static_cast<const float*>(leaf.grad) + begin,
      leaf.history + begin, end - begin, hp, leaf.neg_lr, leaf.wd);
}

// Elements [begin, end) of one float16/bfloat16 leaf with its float32 master copy.
template <bool kRescaleFma, typename Kind>
void StepRange(Kind, const Leaf& leaf, const Hyper& hp, int64_t begin, int64_t end) {
  uint16_t* __restrict w = static_cast<uint16_t*>(leaf.weight);
  const uint16_t* __restrict g = static_cast<const uint16_t*>(leaf.grad);
  float* __restrict m = leaf.master;
  float* __restrict h = leaf.history;
  const float eps = hp.epsilon, neg_lr = leaf.neg_lr, wd = leaf.wd;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = Decayed<kRescaleFma>(Kind::ToF32(g[i]), m[i], hp, wd);
    const float hi = Fma(gi, gi, h[i]);
    const float mi = Fma(gi / (std::sqrt(hi) + eps), neg_lr, m[i]);
    const float wi = Kind::ToF32(w[i]);
    h[i] = hi;
    m[i] = mi;
    w[i] = Kind::FromF32(wi + (Kind::ToF32(Kind::FromF32(mi)) - wi));
  }
}

// A row's sum of squares in the order of mx_adagrad.transforms._row_sum_of_squares: 16 lanes,
// each started at `zero` (0 * history there, NaN when the history is not finite) plus the square
// of element j, then element e contracted into lane e % 16 left to right, then the lanes halved
// (lane j += lane j + ceil(n / 2), an odd count leaving the middle lane) down to one.
constexpr int64_t kSumLanes = 16;

inline float SumSquares(const float* __restrict g, int64_t width, float zero) {
  float lanes[kSumLanes];
  int64_t count = std::min(width, kSumLanes);
  for (int64_t j = 0; j < count; ++j) lanes[j] = zero + g[j] * g[j];
  for (int64_t e = kSumLanes; e < width; e += kSumLanes) {
    const int64_t size = std::min(kSumLanes, width - e);
    for (int64_t j = 0; j < size; ++j) lanes[j] = Fma(g[e + j], g[e + j], lanes[j]);
  }
  while (count > 1) {
    const int64_t half = (count + 1) / 2;
    for (int64_t j = 0; j < count - half; ++j) lanes[j] += lanes[j + half];
    count = half;
  }
  return count == 0 ? zero : lanes[0];
}

// One row of the row-wise step (one history number per row):
//
//   h = h + sum(g * g) * (1 / width)         (the sum in SumSquares' order)
//   w = w + g * (1 / (sqrt(h) + epsilon)) * neg_lr
//
// `scratch` holds `width` floats: the row's gradient, computed once, read twice.
template <bool kRescaleFma, bool kDecay, bool kFused>
void RowwiseRow(float* __restrict w, const float* __restrict g, float* __restrict h,
                int64_t width, const Hyper& hp, float neg_lr, float wd, float* __restrict scratch) {
  if (width == 1) {  // the mean of one square is the square: element-wise, as the optax form
    ElementwiseRow<kRescaleFma, kDecay, kFused>(w, g, h, 1, hp, neg_lr, wd);
    return;
  }
  for (int64_t e = 0; e < width; ++e) {
    scratch[e] = Gradient<kRescaleFma, kDecay>(g[e], w[e], hp, wd);
  }
  const float sum = SumSquares(scratch, width, *h * 0.0f);
  const float hr = Fma(sum, 1.0f / static_cast<float>(width), *h);
  *h = hr;
  // One division per row, then a multiplication per element, as the optax form writes it.
  const float reciprocal = 1.0f / (std::sqrt(hr) + hp.epsilon);
  for (int64_t e = 0; e < width; ++e) {
    w[e] = Apply<kFused>(scratch[e] * reciprocal, neg_lr, w[e]);
  }
}

}  // namespace mx_adagrad

#endif  // MX_ADAGRAD_NATIVE_STEP_H_
