// The one-pass AdaGrad step of sparse gradients on float32 tables, for the XLA CPU backend:
// every table's touched rows updated in place, all tables in one call, on the threads of XLA's
// pool.
//
// A table's gradient is a RowSparse or the terms of a BagGrad (groups.h). Per table:
//
//   group the gradient's terms by row                                   (groups.h: radix sort)
//   for every touched row r, its terms summed into g (as coalesce sums them):
//     element-wise:  g = clip(rescale * g) + wd * w[r];  h[r] += g * g;
//                    w[r] += g / (sqrt(h[r]) + epsilon) * neg_lr
//     row-wise:      the same g;  h[r] += mean(g * g);  w[r] += g / (sqrt(h[r]) + epsilon) * neg_lr
//
// or another rule of step.h (epsilon inside the root; MXNet 1.x's decay after the division), as
// the attributes say (adagrad.cc's top).
// with the roundings of the optax form of the same step on the same leaf (mx_adagrad's transforms
// on the coalesced rows, then apply_updates' scatter-add), so the two are bitwise equal
// (tests/test_native.py): step.h's arithmetic with the weight's update added in a rounding of its
// own (step.h: Apply<false>) and, when the weight decay is a concrete 0, no decay term. Rows the
// gradient does not touch are not read. The work is split by table for the grouping and by
// blocks of touched rows for the updates; every row's numbers depend on its own terms only, so
// the results are the same whatever the number of threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "groups.h"
#include "parallel.h"
#include "step.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace mx_adagrad;  // NOLINT: the arithmetic of step.h and groups.h

// Touched rows ahead of the one being stepped whose weight and history lines are requested early:
// each is a random DRAM access.
constexpr int64_t kPrefetchRows = 16;
// The update phase is cut into tasks of about this much work, counted as terms summed plus
// kRowCost per touched row (its weight and history rows read and written): tasks of equal work,
// not of equal rows, because a few hot rows (a Zipf law's head) hold most of the terms.
constexpr int64_t kWorkPerTask = 4096;
constexpr int64_t kRowCost = 8;

struct Table {
  const void* ids;
  bool ids64;
  int64_t n;
  Terms terms;
  int64_t bags;
  float* weight;
  float* history;
  int64_t num_rows;
  bool rowwise;  // one history number per row
  float neg_lr, wd;
  bool decay;
  Groups* groups;
};

template <typename R>
void StepRow(const Table& t, float* w, const float* g, float* h, const Hyper& hp,
             float* scratch) {
  if (t.rowwise) {
    RowwiseRow<R, false>(w, g, h, t.terms.width, hp, t.neg_lr, t.wd, scratch);
  } else {
    ElementwiseRow<R, false>(w, g, h, t.terms.width, hp, t.neg_lr, t.wd);
  }
}

// Touched rows [begin, end) of table t (in its order of rows).
template <typename R>
void StepRows(const Table& t, const Hyper& hp, int64_t begin, int64_t end) {
  const int64_t width = t.terms.width;
  const int64_t h_width = t.rowwise ? 1 : width;
  const Groups& g = *t.groups;
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(2 * width)) buffer.resize(2 * width);
  float* summed = buffer.data();
  float* scratch = summed + width;
  const int64_t lines = std::min<int64_t>(width, 128);  // floats: up to 512 bytes of a row
  for (int64_t k = begin; k < end; ++k) {
    if (k + kPrefetchRows < end) {
      const int64_t next = g.unique[k + kPrefetchRows];
      for (int64_t e = 0; e < lines; e += 16) __builtin_prefetch(t.weight + next * width + e, 1);
      for (int64_t e = 0; e < std::min(lines, h_width); e += 16) {
        __builtin_prefetch(t.history + next * h_width + e, 1);
      }
    }
    SumGroup(t.terms, g, k, summed);
    const int64_t r = g.unique[k];
    StepRow<R>(t, t.weight + r * width, summed, t.history + r * h_width, hp,
                                 scratch);
  }
}

void Group(const Table& t) {
  if (t.ids64) {
    GroupIds(static_cast<const int64_t*>(t.ids), t.n, t.num_rows, t.terms.bag, t.bags, *t.groups);
  } else {
    GroupIds(static_cast<const int32_t*>(t.ids), t.n, t.num_rows, t.terms.bag, t.bags, *t.groups);
  }
}

float* InPlace(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  if (out->untyped_data() != in.untyped_data()) {
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  }
  return static_cast<float*>(out->untyped_data());
}

constexpr size_t kArgsPerTable = 6;

// Arguments: hyper f32[3] (rescale, clip, epsilon), coef f32[tables, 3] (neg_lr, wd, 1 if the step decays else 0), then per table: ids s32[n] or
// s64[n]; bag s32[n] (a BagGrad) or s32[0] (a RowSparse); scale f32[n] or f32[0]; values
// f32[bags, width] (f32[n, width] for a RowSparse); weight f32[rows, width...]; history like
// weight (element-wise) or of `rows` elements (rowwise). Results: per table weight and history,
// aliased. Attributes: rowwise, and adagrad.cc's rescale_fma, decay, eps_inside, decay_after,
// fold_rescale.
ffi::Error SparseStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper,
                      ffi::Buffer<ffi::F32> coef, ffi::RemainingArgs args,
                      ffi::RemainingRets rets, int64_t rowwise, int64_t rescale_fma,
                      int64_t decay, int64_t eps_inside, int64_t decay_after,
                      int64_t fold_rescale) {
  const auto dims = coef.dimensions();
  if (hyper.element_count() != 3 || dims.size() != 2 || dims[1] != 3) {
    return ffi::Error::InvalidArgument("mx_adagrad: hyper must be f32[3], coef f32[n, 3]");
  }
  const size_t count = static_cast<size_t>(dims[0]);
  if (args.size() != count * kArgsPerTable || rets.size() != count * 2) {
    return ffi::Error::InvalidArgument("mx_adagrad: wrong number of sparse step buffers");
  }
  const float* p = hyper.typed_data();
  const Hyper hp{p[0], p[1], p[2]};
  const float* c = coef.typed_data();
  std::vector<LeasedGroups> groups(count);
  std::vector<Table> tables;
  for (size_t i = 0; i < count; ++i) {
    auto ids = args.get<ffi::AnyBuffer>(i * kArgsPerTable);
    auto bag = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 1);
    auto scale = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 2);
    auto values = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 3);
    auto weight = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 4);
    auto history = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 5);
    auto weight_out = rets.get<ffi::AnyBuffer>(i * 2);
    auto history_out = rets.get<ffi::AnyBuffer>(i * 2 + 1);
    if (!ids || !bag || !scale || !values || !weight || !history || !weight_out ||
        !history_out) {
      return ffi::Error::InvalidArgument("mx_adagrad: sparse step buffers must be arrays");
    }
    const auto w_dims = weight->dimensions();
    const int64_t n = static_cast<int64_t>(ids->element_count());
    const int64_t num_rows = w_dims.size() == 0 ? 0 : w_dims[0];
    const int64_t width =
        num_rows == 0 ? 0 : static_cast<int64_t>(weight->element_count()) / num_rows;
    const bool bags = bag->element_count() > 0;
    const int64_t value_rows = width == 0 ? 0 : values->element_count() / width;
    const int64_t h_expected = rowwise ? num_rows : num_rows * width;
    const bool ids_ok = ids->dimensions().size() == 1 &&
                        (ids->element_type() == ffi::DataType::S32 ||
                         ids->element_type() == ffi::DataType::S64);
    if (!ids_ok || w_dims.size() == 0 || weight->element_type() != ffi::DataType::F32 ||
        history->element_type() != ffi::DataType::F32 ||
        values->element_type() != ffi::DataType::F32 ||
        static_cast<int64_t>(history->element_count()) != h_expected ||
        (bags && (bag->element_type() != ffi::DataType::S32 ||
                  static_cast<int64_t>(bag->element_count()) != n)) ||
        (scale->element_count() > 0 && (scale->element_type() != ffi::DataType::F32 ||
                                        static_cast<int64_t>(scale->element_count()) != n)) ||
        static_cast<int64_t>(values->element_count()) != value_rows * width ||
        (!bags && value_rows != n) || num_rows >= kMaxGrouped || n >= kMaxGrouped) {
      return ffi::Error::InvalidArgument("mx_adagrad: sparse step got mismatched operands");
    }
    Table t;
    t.ids = ids->untyped_data();
    t.ids64 = ids->element_type() == ffi::DataType::S64;
    t.n = width == 0 ? 0 : n;
    t.terms = Terms{static_cast<const float*>(values->untyped_data()),
                    bags ? static_cast<const int32_t*>(bag->untyped_data()) : nullptr,
                    scale->element_count() > 0 ? static_cast<const float*>(scale->untyped_data())
                                               : nullptr,
                    width, n == 1};
    t.bags = value_rows;
    t.weight = InPlace(*weight, *weight_out);
    t.history = InPlace(*history, *history_out);
    t.num_rows = num_rows;
    t.rowwise = rowwise != 0;
    t.neg_lr = c[3 * i];
    t.wd = c[3 * i + 1];
    t.decay = c[3 * i + 2] != 0.0f;
    t.groups = groups[i].get();
    tables.push_back(t);
  }
  const int64_t threads = pool.num_threads();
  ParallelFor(pool, static_cast<int64_t>(count), threads, [&](int64_t i) { Group(tables[i]); });
  struct Task {
    size_t table;
    int64_t begin, end;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < count; ++i) {
    const Groups& g = *tables[i].groups;
    int64_t begin = 0, work = 0;
    for (int64_t k = 0; k < g.size(); ++k) {
      work += g.start[k + 1] - g.start[k] + kRowCost;
      if (work >= kWorkPerTask || k + 1 == g.size()) {
        tasks.push_back(Task{i, begin, k + 1});
        begin = k + 1;
        work = 0;
      }
    }
  }
  ParallelFor(pool, static_cast<int64_t>(tasks.size()), threads, [&](int64_t j) {
    const Task& task = tasks[j];
    const Table& t = tables[task.table];
    const bool decays = decay != 0 && t.decay;
    const Flags flags{rescale_fma != 0, decays, eps_inside != 0, decay_after != 0,
                      fold_rescale != 0 && !decays};
    WithRule(flags, [&](auto rule) { StepRows<decltype(rule)>(t, hp, task.begin, task.end); });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradSparseStepF32, SparseStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("rowwise")
                                  .Attr<int64_t>("rescale_fma")
                                  .Attr<int64_t>("decay")
                                  .Attr<int64_t>("eps_inside")
                                  .Attr<int64_t>("decay_after")
                                  .Attr<int64_t>("fold_rescale"));
