// MXNet 2.0's AdaGrad step for a RowSparse gradient of a float32 table, on the XLA CPU backend:
// the table's rows that the gradient touches, updated in place in one pass.
//
//   rows = the gradient's rows with duplicate ids summed          (coalesce.h, as sparse.coalesce)
//   for every distinct id r, with its summed row g:
//     weight[r], history[r] = the dense one-pass step of (weight[r], g, history[r])    (step.h)
//
// The arithmetic is the dense kernel's, element for element (step.h), so a touched row gets the
// bits the dense step gives it on the densified gradient: XLA CPU's own sparse program differs
// from both in where it contracts multiply-adds (tests/test_native.py). Weight decay is lazy
// (touched rows only), as sparse_wd="lazy". Rows the gradient does not touch are not read.
// What this saves against the XLA program of the same step: the n-row intermediates (the summed
// rows, the gathered weight and history rows, the new history rows, the updates), each written
// and read back, and the padding slots of the static shape, which XLA processes as rows.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "coalesce.h"
#include "step.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace mx_adagrad;  // NOLINT: the arithmetic of step.h and coalesce.h

// Distinct rows ahead of the one being stepped whose weight and history lines are requested early:
// each is a random DRAM access.
constexpr size_t kPrefetchRows = 16;

template <typename Id>
void StepRows(const Id* ids, int64_t n, const float* values, int64_t width, int64_t num_rows,
              float* weight, float* history, const Hyper& hp, float neg_lr, float wd,
              bool rescale_fma) {
  // Per thread, kept across calls: the summed rows of one gradient (n * width floats).
  thread_local std::vector<float> rows;
  thread_local std::vector<int64_t> unique;
  if (rows.size() < static_cast<size_t>(n * width)) rows.resize(static_cast<size_t>(n * width));
  SumDuplicates(ids, n, num_rows, values, width, unique, rows.data());
  const int64_t ahead = std::min<int64_t>(width, 128);  // floats: up to 512 bytes of a row
  for (size_t k = 0; k < unique.size(); ++k) {
    if (k + kPrefetchRows < unique.size()) {
      const int64_t next = unique[k + kPrefetchRows] * width;
      for (int64_t e = 0; e < ahead; e += 16) {
        __builtin_prefetch(weight + next + e, 1);
        __builtin_prefetch(history + next + e, 1);
      }
    }
    const int64_t at = unique[k] * width;
    const Leaf leaf{weight + at, rows.data() + k * width, nullptr, history + at, width, neg_lr, wd};
    if (rescale_fma) {
      StepRange<true>(Float32{}, leaf, hp, 0, width);
    } else {
      StepRange<false>(Float32{}, leaf, hp, 0, width);
    }
  }
}

float* InPlace(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  if (out->untyped_data() != in.untyped_data()) {
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  }
  return static_cast<float*>(out->untyped_data());
}

// Arguments: hyper f32[4] (rescale, clip, epsilon, 1 for the kRescaleFma variant else 0), coef
// f32[2] (neg_lr, wd), ids s32[n] or s64[n], values f32[n, ...], weight f32[rows, ...], history
// f32[rows, ...]. Results: weight and history, aliased to their arguments.
ffi::Error SparseStep(ffi::Buffer<ffi::F32> hyper, ffi::Buffer<ffi::F32> coef, ffi::AnyBuffer ids,
                      ffi::Buffer<ffi::F32> values, ffi::AnyBuffer weight, ffi::AnyBuffer history,
                      ffi::Result<ffi::AnyBuffer> weight_out,
                      ffi::Result<ffi::AnyBuffer> history_out) {
  const auto dims = weight.dimensions();
  const int64_t n = static_cast<int64_t>(ids.element_count());
  if (hyper.element_count() != 4 || coef.element_count() != 2 || ids.dimensions().size() != 1 ||
      dims.size() == 0 || weight.element_type() != ffi::DataType::F32 ||
      history.element_type() != ffi::DataType::F32 ||
      history.element_count() != weight.element_count()) {
    return ffi::Error::InvalidArgument("mx_adagrad: sparse step got mismatched operands");
  }
  const int64_t num_rows = dims[0];
  const int64_t width = num_rows == 0 ? 0 : static_cast<int64_t>(weight.element_count()) / num_rows;
  if (static_cast<int64_t>(values.element_count()) != n * width) {
    return ffi::Error::InvalidArgument("mx_adagrad: sparse step values do not match the table");
  }
  float* w = InPlace(weight, weight_out);
  float* h = InPlace(history, history_out);
  if (n == 0 || width == 0) return ffi::Error::Success();
  const float* p = hyper.typed_data();
  const Hyper hp{p[0], p[1], p[2]};
  const float* c = coef.typed_data();
  switch (ids.element_type()) {
    case ffi::DataType::S32:
      StepRows(static_cast<const int32_t*>(ids.untyped_data()), n, values.typed_data(), width,
               num_rows, w, h, hp, c[0], c[1], p[3] != 0.0f);
      return ffi::Error::Success();
    case ffi::DataType::S64:
      StepRows(static_cast<const int64_t*>(ids.untyped_data()), n, values.typed_data(), width,
               num_rows, w, h, hp, c[0], c[1], p[3] != 0.0f);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("mx_adagrad: row ids must be int32 or int64");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradSparseStepF32, SparseStep,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
