// The AdaGrad steps for the XLA CPU backend: update and apply in one pass over memory.
//
// One FFI call updates any number of parameters ("leaves"). Per element, in float32, MXNet 2.0's
// step (mx_adagrad.adagrad):
//
//   g = clip(rescale_grad * grad, clip_gradient) + wd * weight
//   history = history + g * g
//   weight = weight + g / (sqrt(history) + epsilon) * neg_lr        (neg_lr = -lr * lr_mult)
//
// or, with the attribute eps_inside, sqrt(history + epsilon), and with decay_after MXNet 1.x's
// decay, g / sqrt(history + epsilon) + wd * weight, outside the history (mx_adagrad.legacy.adagrad)
// (step.h: one Rule per variant). Each is computed with the same operations, order and roundings
// as the XLA CPU program of its optax form followed by apply_updates, so the results are bitwise
// equal (tests/test_native.py). That includes XLA's fused multiply-adds: XLA CPU lets LLVM
// contract a multiply feeding an add into one FMA (one rounding) where the CPU has FMA
// instructions, so the kernel calls Fma() at exactly those places: the decay (`g + wd * w`), the
// history (`h + g * g`) and the weight (`w + q * neg_lr`). When the gradient is rescaled and not
// clipped, LLVM contracts `g * rescale + wd * w` on the rescale instead, except for a bfloat16
// gradient converted to float32: the attribute rescale_fma, chosen in Python (rescale_fma in
// __init__.py). This matches jaxlib 0.10.2's XLA CPU; if a later XLA contracts differently,
// tests/test_native.py fails and says where. The float16 and bfloat16 variants are
// multi_precision: they step a float32 master copy and history, and write the weight as XLA does,
// weight + (low(master) - weight) rounded to the weight's dtype.
//
// The row-wise handler (MxAdagradRowwiseStepF32: mx_adagrad.rowwise_adagrad, and with eps_inside
// MXNet's GroupAdaGrad) steps float32 leaves of two or more axes a row at a time, one history
// number per row (step.h: RowwiseRow):
//
//   g = as above;  history = history + sum(g * g) * (1 / width);  weight = weight + g * (1 /
//   root(history)) * neg_lr
//
// with the sum in the order mx_adagrad.transforms writes it, so it too is bitwise its optax form.
//
// Build flags (mx_adagrad/_native/library.py): -O3 -march=native -fno-math-errno
// -ffp-contract=off. Without -fno-math-errno the sqrt does not vectorize; -ffp-contract=off keeps
// the compiler from contracting anything beyond the explicit Fma() calls. Neither flag changes an
// IEEE result.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "step.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace mx_adagrad;  // NOLINT: the arithmetic of step.h

// Elements per task: 64K float32 elements are 256 KiB per array, enough to amortize scheduling
// and small enough to balance two to a few dozen threads.
constexpr int64_t kChunk = int64_t{1} << 16;
// Below this many elements in one call, one thread does everything (thread hand-off costs more).
constexpr int64_t kMinParallel = int64_t{1} << 17;

// The leaves of one call, seen as one index space cut into chunks that threads claim in turn.
template <typename Kind>
struct Work {
  std::vector<Leaf> leaves;
  std::vector<int64_t> starts;  // starts[i]: the index of leaves[i]'s first element
  int64_t total = 0;
  Hyper hp{};
  Flags flags{};

  void Run(int64_t begin, int64_t end) const {
    auto it = std::upper_bound(starts.begin(), starts.end(), begin) - 1;
    for (size_t i = it - starts.begin(); i < leaves.size() && starts[i] < end; ++i) {
      const int64_t lo = std::max(begin, starts[i]) - starts[i];
      const int64_t hi = std::min(end, starts[i] + leaves[i].size) - starts[i];
      if (lo >= hi) continue;
      WithRule(flags, [&](auto rule) {
        StepRange<decltype(rule)>(Kind{}, leaves[i], hp, lo, hi);
      });
    }
  }
};

// Copies an input into its output buffer when XLA did not alias them (it always does when the
// call declares input_output_aliases; this keeps the kernel correct regardless).
void* InPlace(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  if (out->untyped_data() != in.untyped_data()) {
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  }
  return out->untyped_data();
}

// Runs work.Run over [0, work.total) in chunks on the pool's threads (one thread below
// kMinParallel elements, where the hand-off costs more than it saves).
template <typename W>
void RunChunks(ffi::ThreadPool& pool, const W& work) {
  if (work.total < kMinParallel) {
    work.Run(0, work.total);
    return;
  }
  const int64_t chunks = (work.total + kChunk - 1) / kChunk;
  ParallelFor(pool, chunks, pool.num_threads(), [&](int64_t c) {
    work.Run(c * kChunk, std::min(work.total, (c + 1) * kChunk));
  });
}

Flags ReadFlags(int64_t rescale_fma, int64_t decay, int64_t eps_inside, int64_t decay_after,
                int64_t fold_rescale) {
  return Flags{rescale_fma != 0, decay != 0, eps_inside != 0, decay_after != 0,
               fold_rescale != 0 && decay == 0};
}

// Arguments: hyper f32[3] (rescale, clip, epsilon), coef f32[n, 2] (neg_lr, wd per leaf), then per
// leaf weight, grad, [master,] history. Results: per leaf weight, [master,] history, each aliased
// to its input. Attributes: rescale_fma, decay (0: no weight-decay term at all, GroupAdaGrad),
// eps_inside, decay_after, fold_rescale (see the top and step.h's Rule).
template <typename Kind>
ffi::Error Step(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper, ffi::Buffer<ffi::F32> coef,
                ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t rescale_fma,
                int64_t decay, int64_t eps_inside, int64_t decay_after,
                int64_t fold_rescale) {
  constexpr size_t kIn = Kind::kMaster ? 4 : 3;
  constexpr size_t kOut = kIn - 1;
  const auto dims = coef.dimensions();
  if (dims.size() != 2 || dims[1] != 2 || hyper.element_count() != 3) {
    return ffi::Error::InvalidArgument("mx_adagrad: hyper must be f32[3], coef f32[n, 2]");
  }
  const size_t n = static_cast<size_t>(dims[0]);
  if (args.size() != n * kIn || rets.size() != n * kOut) {
    return ffi::Error::InvalidArgument("mx_adagrad: wrong number of leaf buffers");
  }
  Work<Kind> work;
  const float* h = hyper.typed_data();
  work.hp = Hyper{h[0], h[1], h[2]};
  work.flags = ReadFlags(rescale_fma, decay, eps_inside, decay_after, fold_rescale);
  work.leaves.reserve(n);
  work.starts.reserve(n);
  const float* c = coef.typed_data();
  for (size_t i = 0; i < n; ++i) {
    auto w = args.get<ffi::AnyBuffer>(i * kIn);
    auto g = args.get<ffi::AnyBuffer>(i * kIn + 1);
    auto hist = args.get<ffi::AnyBuffer>(i * kIn + kIn - 1);
    auto w_out = rets.get<ffi::AnyBuffer>(i * kOut);
    auto h_out = rets.get<ffi::AnyBuffer>(i * kOut + kOut - 1);
    if (!w || !g || !hist || !w_out || !h_out) {
      return ffi::Error::InvalidArgument("mx_adagrad: leaf buffers must be arrays");
    }
    const int64_t size = static_cast<int64_t>(w->element_count());
    if (w->element_type() != Kind::kType || g->element_type() != Kind::kType ||
        hist->element_type() != ffi::DataType::F32 || g->element_count() != size ||
        hist->element_count() != size) {
      return ffi::Error::InvalidArgument("mx_adagrad: leaf dtype or size mismatch");
    }
    Leaf leaf{InPlace(*w, *w_out), g->untyped_data(), nullptr,
              static_cast<float*>(InPlace(*hist, *h_out)), size, c[2 * i], c[2 * i + 1]};
    if constexpr (Kind::kMaster) {
      auto m = args.get<ffi::AnyBuffer>(i * kIn + 2);
      auto m_out = rets.get<ffi::AnyBuffer>(i * kOut + 1);
      if (!m || !m_out || m->element_type() != ffi::DataType::F32 || m->element_count() != size) {
        return ffi::Error::InvalidArgument("mx_adagrad: master must be float32 like the weight");
      }
      leaf.master = static_cast<float*>(InPlace(*m, *m_out));
    }
    work.starts.push_back(work.total);
    work.leaves.push_back(leaf);
    work.total += size;
  }
  RunChunks(pool, work);
  return ffi::Error::Success();
}

// The leaves of one row-wise call: tables of rows of `width` elements, one history number per
// row, seen as one index space of elements whose chunks are cut at row boundaries.
struct RowwiseWork {
  struct Table {
    float* weight;
    const float* grad;
    float* history;
    int64_t rows, width;
    float neg_lr, wd;
  };
  std::vector<Table> tables;
  std::vector<int64_t> starts;  // starts[i]: the index of tables[i]'s first element
  int64_t total = 0;
  Hyper hp{};
  Flags flags{};

  // The rows whose first element lies in [begin, end), in every table.
  void Run(int64_t begin, int64_t end) const {
    thread_local std::vector<float> scratch;
    auto it = std::upper_bound(starts.begin(), starts.end(), begin) - 1;
    for (size_t i = it - starts.begin(); i < tables.size() && starts[i] < end; ++i) {
      const Table& t = tables[i];
      if (static_cast<int64_t>(scratch.size()) < t.width) scratch.resize(t.width);
      const int64_t first = (std::max(begin, starts[i]) - starts[i] + t.width - 1) / t.width;
      const int64_t last = std::min(t.rows, (end - starts[i] + t.width - 1) / t.width);
      WithRule(flags, [&](auto rule) {
        for (int64_t r = first; r < last; ++r) {
          RowwiseRow<decltype(rule), true>(t.weight + r * t.width, t.grad + r * t.width,
                                           t.history + r, t.width, hp, t.neg_lr, t.wd,
                                           scratch.data());
        }
      });
    }
  }
};

// Row-wise AdaGrad, dense: arguments hyper and coef as Step's, then per table weight f32[rows,
// ...], grad like weight, history of `rows` elements (f32[rows], or GroupAdaGrad's f32[rows, 1]).
// Results: per table weight and history, aliased. Attributes as Step's.
ffi::Error RowwiseStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper,
                       ffi::Buffer<ffi::F32> coef, ffi::RemainingArgs args,
                       ffi::RemainingRets rets, int64_t rescale_fma, int64_t decay,
                       int64_t eps_inside, int64_t decay_after, int64_t fold_rescale) {
  const auto dims = coef.dimensions();
  if (dims.size() != 2 || dims[1] != 2 || hyper.element_count() != 3) {
    return ffi::Error::InvalidArgument("mx_adagrad: hyper must be f32[3], coef f32[n, 2]");
  }
  const size_t n = static_cast<size_t>(dims[0]);
  if (args.size() != n * 3 || rets.size() != n * 2) {
    return ffi::Error::InvalidArgument("mx_adagrad: wrong number of leaf buffers");
  }
  RowwiseWork work;
  const float* h = hyper.typed_data();
  work.hp = Hyper{h[0], h[1], h[2]};
  work.flags = ReadFlags(rescale_fma, decay, eps_inside, decay_after, fold_rescale);
  const float* c = coef.typed_data();
  for (size_t i = 0; i < n; ++i) {
    auto w = args.get<ffi::AnyBuffer>(i * 3);
    auto g = args.get<ffi::AnyBuffer>(i * 3 + 1);
    auto hist = args.get<ffi::AnyBuffer>(i * 3 + 2);
    auto w_out = rets.get<ffi::AnyBuffer>(i * 2);
    auto h_out = rets.get<ffi::AnyBuffer>(i * 2 + 1);
    if (!w || !g || !hist || !w_out || !h_out) {
      return ffi::Error::InvalidArgument("mx_adagrad: leaf buffers must be arrays");
    }
    const auto w_dims = w->dimensions();
    const int64_t size = static_cast<int64_t>(w->element_count());
    const int64_t rows = w_dims.size() == 0 ? 0 : w_dims[0];
    if (w_dims.size() < 2 || w->element_type() != ffi::DataType::F32 ||
        g->element_type() != ffi::DataType::F32 || hist->element_type() != ffi::DataType::F32 ||
        g->element_count() != w->element_count() ||
        static_cast<int64_t>(hist->element_count()) != rows) {
      return ffi::Error::InvalidArgument("mx_adagrad: row-wise leaf dtype or size mismatch");
    }
    if (size == 0) continue;
    work.tables.push_back(RowwiseWork::Table{
        static_cast<float*>(InPlace(*w, *w_out)), static_cast<const float*>(g->untyped_data()),
        static_cast<float*>(InPlace(*hist, *h_out)), rows, size / rows, c[2 * i], c[2 * i + 1]});
    work.starts.push_back(work.total);
    work.total += size;
  }
  RunChunks(pool, work);
  return ffi::Error::Success();
}

}  // namespace

// The attributes every step handler takes (see the top).
#define MX_ADAGRAD_STEP_BINDING              \
  ffi::Ffi::Bind()                            \
      .Ctx<ffi::ThreadPool>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()           \
      .Arg<ffi::Buffer<ffi::F32>>()           \
      .RemainingArgs()                        \
      .RemainingRets()                        \
      .Attr<int64_t>("rescale_fma")           \
      .Attr<int64_t>("decay")                 \
      .Attr<int64_t>("eps_inside")            \
      .Attr<int64_t>("decay_after")           \
      .Attr<int64_t>("fold_rescale")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradStepF32, Step<Float32>,
                              MX_ADAGRAD_STEP_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradStepBF16, Step<BFloat16>,
                              MX_ADAGRAD_STEP_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradStepF16, Step<Float16>,
                              MX_ADAGRAD_STEP_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradRowwiseStepF32, RowwiseStep,
                              MX_ADAGRAD_STEP_BINDING);
