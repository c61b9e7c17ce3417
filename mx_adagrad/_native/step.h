// The per-element arithmetic of MXNet 2.0's AdaGrad step, shared by the dense one-pass kernel
// (adagrad.cc) and the sparse one (sparse_step.cc). See adagrad.cc for what it matches and how.

#ifndef MX_ADAGRAD_NATIVE_STEP_H_
#define MX_ADAGRAD_NATIVE_STEP_H_

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

// Elements [begin, end) of one float32 leaf.
template <bool kRescaleFma>
void StepRange(Float32, const Leaf& leaf, const Hyper& hp, int64_t begin, int64_t end) {
  float* __restrict w = static_cast<float*>(leaf.weight);
  const float* __restrict g = static_cast<const float*>(leaf.grad);
  float* __restrict h = leaf.history;
  const float eps = hp.epsilon, neg_lr = leaf.neg_lr, wd = leaf.wd;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = Decayed<kRescaleFma>(g[i], w[i], hp, wd);
    const float hi = Fma(gi, gi, h[i]);
    h[i] = hi;
    w[i] = Fma(gi / (std::sqrt(hi) + eps), neg_lr, w[i]);
  }
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

}  // namespace mx_adagrad

#endif  // MX_ADAGRAD_NATIVE_STEP_H_
