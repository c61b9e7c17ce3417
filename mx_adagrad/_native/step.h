// The arithmetic of the AdaGrad steps, shared by the dense one-pass kernels (adagrad.cc) and the
// sparse one (sparse_step.cc). One parametrized step covers the family (a Rule): MXNet 2.0's
// AdaGrad, MXNet 1.x's (epsilon inside the root, weight decay after the division), the row-wise
// step (TorchRec) and MXNet's GroupAdaGrad (row-wise, epsilon inside the root). See adagrad.cc for
// what it matches and how.

#ifndef MX_ADAGRAD_NATIVE_STEP_H_
#define MX_ADAGRAD_NATIVE_STEP_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// What a step computes, fixed at compile time:
//   kRescaleFma: XLA contracts `g * rescale + wd * w` on the rescale (see Decayed);
//   kDecay: the step has a weight-decay term at all (not when it is a concrete 0 on a sparse step);
//   kEpsInside: divide by sqrt(h + eps) (MXNet 1.x, GroupAdaGrad), not sqrt(h) + eps;
//   kDecayAfter: MXNet 1.x's decay, wd * w added to the scaled gradient, outside the history;
//   kFoldRescale: the row-wise weight update is g * (reciprocal * rescale), as XLA rewrites
//     (g * rescale) * reciprocal when the rescale is a constant and nothing (no clip, no decay)
//     comes between.
template <bool kRescaleFma, bool kDecay, bool kEpsInside, bool kDecayAfter, bool kFoldRescale>
struct Rule {
  static constexpr bool rescale_fma = kRescaleFma;
  static constexpr bool decay = kDecay;
  static constexpr bool eps_inside = kEpsInside;
  static constexpr bool decay_after = kDecayAfter;
  static constexpr bool fold_rescale = kFoldRescale;
};

// The flags of a call, as the kernels read them from its attributes. fold_rescale holds only
// where there is no decay (the call's attribute says the rescale is a constant and unclipped).
struct Flags {
  bool rescale_fma, decay, eps_inside, decay_after, fold_rescale;
};

template <typename F>
void Branch(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(Rule<...>{}) with the rule that `flags` name. Flags that cannot matter are dropped
// (no decay: neither its placement nor its contraction; decay after the division: no
// contraction with the rescale; with one, no folded rescale), so ten rules are compiled.
template <typename F>
void WithRule(const Flags& flags, F&& f) {
  Branch(flags.eps_inside, [&](auto inside) {
    constexpr bool kInside = decltype(inside)::value;
    if (!flags.decay) {
      Branch(flags.fold_rescale, [&](auto fold) {
        f(Rule<false, false, kInside, false, decltype(fold)::value>{});
      });
    } else if (flags.decay_after) {
      f(Rule<false, true, kInside, true, false>{});
    } else {
      Branch(flags.rescale_fma, [&](auto fma) {
        f(Rule<decltype(fma)::value, true, kInside, false, false>{});
      });
    }
  });
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

// The gradient the history sees: clipped, rescaled and (MXNet 2.0's placement) decayed.
// Without a decay term, or with MXNet 1.x's decay after the division, it is not decayed.
template <typename R>
inline float Gradient(float grad, float weight, const Hyper& hp, float wd) {
  if constexpr (R::decay && !R::decay_after) {
    return Decayed<R::rescale_fma>(grad, weight, hp, wd);
  } else {
    return Clip(grad * hp.rescale, hp.clip);
  }
}

// The denominator: sqrt(h) + epsilon, or sqrt(h + epsilon) with kEpsInside.
template <typename R>
inline float Root(float h, float epsilon) {
  if constexpr (R::eps_inside) {
    return std::sqrt(h + epsilon);
  } else {
    return std::sqrt(h) + epsilon;
  }
}

// MXNet 1.x's decay of the scaled gradient q (q + wd * w, contracted); q itself otherwise.
template <typename R>
inline float DecayedAfter(float q, float weight, float wd) {
  if constexpr (R::decay && R::decay_after) {
    return Fma(wd, weight, q);
  } else {
    return q;
  }
}

// One element of the element-wise step: updates `history` and returns the new weight.
template <typename R, bool kFused>
inline float StepElement(float grad, float weight, float& history, const Hyper& hp, float neg_lr,
                         float wd) {
  const float g = Gradient<R>(grad, weight, hp, wd);
  const float h = Fma(g, g, history);
  history = h;
  return Apply<kFused>(DecayedAfter<R>(g / Root<R>(h, hp.epsilon), weight, wd), neg_lr, weight);
}

// One row of the element-wise step: weight, gradient and history rows of `width` elements.
template <typename R, bool kFused>
void ElementwiseRow(float* __restrict w, const float* __restrict g, float* __restrict h,
                    int64_t width, const Hyper& hp, float neg_lr, float wd) {
  for (int64_t e = 0; e < width; ++e) {
    w[e] = StepElement<R, kFused>(g[e], w[e], h[e], hp, neg_lr, wd);
  }
}

// Elements [begin, end) of one float32 leaf.
template <typename R>
void StepRange(Float32, const Leaf& leaf, const Hyper& hp, int64_t begin, int64_t end) {
  ElementwiseRow<R, true>(static_cast<float*>(leaf.weight) + begin,
                          static_cast<const float*>(leaf.grad) + begin, leaf.history + begin,
                          end - begin, hp, leaf.neg_lr, leaf.wd);
}

// Elements [begin, end) of one float16/bfloat16 leaf with its float32 master copy.
template <typename R, typename Kind>
void StepRange(Kind, const Leaf& leaf, const Hyper& hp, int64_t begin, int64_t end) {
  uint16_t* __restrict w = static_cast<uint16_t*>(leaf.weight);
  const uint16_t* __restrict g = static_cast<const uint16_t*>(leaf.grad);
  float* __restrict m = leaf.master;
  float* __restrict h = leaf.history;
  for (int64_t i = begin; i < end; ++i) {
    const float mi = StepElement<R, true>(Kind::ToF32(g[i]), m[i], h[i], hp, leaf.neg_lr, leaf.wd);
    const float wi = Kind::ToF32(w[i]);
    m[i] = mi;
    w[i] = Kind::FromF32(wi + (Kind::ToF32(Kind::FromF32(mi)) - wi));
  }
}

// A row's sum of squares in the order of mx_adagrad.transforms._row_sum_of_squares: 16 lanes,
// each started at `zero` (minimum(history, 0) there: 0, or NaN for a NaN history) plus the square
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
//   w = w + g * (1 / root(h)) * neg_lr       (root: sqrt(h) + epsilon, or sqrt(h + epsilon))
//
// `scratch` holds `width` floats: the row's gradient, computed once, read twice.
template <typename R, bool kFused>
void RowwiseRow(float* __restrict w, const float* __restrict g, float* __restrict h,
                int64_t width, const Hyper& hp, float neg_lr, float wd, float* __restrict scratch) {
  if (width == 1) {  // the mean of one square is the square: element-wise, as the optax form
    ElementwiseRow<R, kFused>(w, g, h, 1, hp, neg_lr, wd);
    return;
  }
  for (int64_t e = 0; e < width; ++e) {
    scratch[e] = Gradient<R>(g[e], w[e], hp, wd);
  }
  const float sum = SumSquares(scratch, width, std::min(*h, 0.0f));
  const float hr = Fma(sum, 1.0f / static_cast<float>(width), *h);
  *h = hr;
  // One division per row, then a multiplication per element, as the optax form writes it.
  const float reciprocal = 1.0f / Root<R>(hr, hp.epsilon);
  if constexpr (R::fold_rescale) {
    const float folded = reciprocal * hp.rescale;
    for (int64_t e = 0; e < width; ++e) w[e] = Apply<kFused>(g[e] * folded, neg_lr, w[e]);
  } else {
    for (int64_t e = 0; e < width; ++e) {
      w[e] = Apply<kFused>(DecayedAfter<R>(scratch[e] * reciprocal, w[e], wd), neg_lr, w[e]);
    }
  }
}

}  // namespace mx_adagrad

#endif  // MX_ADAGRAD_NATIVE_STEP_H_
