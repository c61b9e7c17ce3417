// Pooled lookups of embedding bags (mx_adagrad.bags) for the XLA CPU backend: every table's bags
// in one call, on the threads of XLA's pool.
//
//   pooled[b] = ((0 + scale[i0] * table[ids[i0]]) + scale[i1] * table[ids[i1]]) + ...
//
// over the positions offsets[b] <= i0 < i1 < ... < offsets[b + 1] whose id is in [0, rows)
// (others are padding), each product rounded before it is added: the bits of the XLA program
// (a segment-sum of the scaled rows, which visits the positions in order). An empty bag pools to
// zeros. Offsets are clamped to [0, len(ids)], so bad offsets give wrong bags, never a bad read.
// The bags are split into blocks that the threads take in turn; a bag is always summed by one
// thread in order, so the results do not depend on the number of threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Bags per task.
constexpr int64_t kBagsPerTask = 64;
// Positions ahead of the one being added whose table rows are requested early.
constexpr int64_t kPrefetchIds = 8;

struct Table {
  const float* rows;
  int64_t num_rows, width;
  const void* ids;
  bool ids64;
  int64_t n;
  const void* offsets;
  bool offsets64;
  int64_t bags;
  const float* scale;
  float* pooled;
};

template <typename T>
int64_t At(const void* data, int64_t i) {
  return static_cast<int64_t>(static_cast<const T*>(data)[i]);
}

int64_t Id(const Table& t, int64_t i) {
  return t.ids64 ? At<int64_t>(t.ids, i) : At<int32_t>(t.ids, i);
}

int64_t Offset(const Table& t, int64_t b) {
  const int64_t o = t.offsets64 ? At<int64_t>(t.offsets, b) : At<int32_t>(t.offsets, b);
  return std::clamp<int64_t>(o, 0, t.n);
}

void PoolBags(const Table& t, int64_t first, int64_t last) {
  const int64_t width = t.width;
  const int64_t lines = std::min<int64_t>(width, 128);
  const int64_t stop = Offset(t, last);
  for (int64_t b = first; b < last; ++b) {
    float* __restrict out = t.pooled + b * width;
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(width));
    const int64_t begin = Offset(t, b), end = std::max(begin, Offset(t, b + 1));
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchIds < stop) {
        const int64_t ahead = Id(t, i + kPrefetchIds);
        if (ahead >= 0 && ahead < t.num_rows) {
          for (int64_t e = 0; e < lines; e += 16) __builtin_prefetch(t.rows + ahead * width + e);
        }
      }
      const int64_t id = Id(t, i);
      if (id < 0 || id >= t.num_rows) continue;
      const float s = t.scale[i];
      const float* __restrict row = t.rows + id * width;
      for (int64_t e = 0; e < width; ++e) out[e] += s * row[e];
    }
  }
}

bool IsIndex(const ffi::AnyBuffer& x) {
  return x.dimensions().size() == 1 &&
         (x.element_type() == ffi::DataType::S32 || x.element_type() == ffi::DataType::S64);
}

constexpr size_t kArgsPerTable = 4;

// Arguments per table: table f32[rows, width], ids s32[n] or s64[n], offsets s32[bags + 1] or
// s64[bags + 1], scale f32[n]. Results per table: pooled f32[bags, width].
ffi::Error Pool(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (args.size() % kArgsPerTable != 0 || rets.size() != args.size() / kArgsPerTable) {
    return ffi::Error::InvalidArgument("mx_adagrad: wrong number of bag buffers");
  }
  std::vector<Table> tables;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto table = args.get<ffi::AnyBuffer>(i * kArgsPerTable);
    auto ids = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 1);
    auto offsets = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 2);
    auto scale = args.get<ffi::AnyBuffer>(i * kArgsPerTable + 3);
    auto pooled = rets.get<ffi::AnyBuffer>(i);
    if (!table || !ids || !offsets || !scale || !pooled) {
      return ffi::Error::InvalidArgument("mx_adagrad: bag buffers must be arrays");
    }
    const auto dims = table->dimensions();
    const int64_t n = static_cast<int64_t>(ids->element_count());
    const int64_t bags = static_cast<int64_t>(offsets->element_count()) - 1;
    if (dims.size() != 2 || table->element_type() != ffi::DataType::F32 || !IsIndex(*ids) ||
        !IsIndex(*offsets) || bags < 0 || scale->element_type() != ffi::DataType::F32 ||
        static_cast<int64_t>(scale->element_count()) != n ||
        (*pooled)->element_type() != ffi::DataType::F32 ||
        static_cast<int64_t>((*pooled)->element_count()) != bags * dims[1]) {
      return ffi::Error::InvalidArgument("mx_adagrad: bag lookup got mismatched operands");
    }
    tables.push_back(Table{static_cast<const float*>(table->untyped_data()), dims[0], dims[1],
                           ids->untyped_data(), ids->element_type() == ffi::DataType::S64, n,
                           offsets->untyped_data(),
                           offsets->element_type() == ffi::DataType::S64, bags,
                           static_cast<const float*>(scale->untyped_data()),
                           static_cast<float*>((*pooled)->untyped_data())});
  }
  struct Task {
    size_t table;
    int64_t first, last;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < tables.size(); ++i) {
    for (int64_t b = 0; b < tables[i].bags; b += kBagsPerTask) {
      tasks.push_back(Task{i, b, std::min(tables[i].bags, b + kBagsPerTask)});
    }
  }
  mx_adagrad::ParallelFor(pool, static_cast<int64_t>(tasks.size()), pool.num_threads(),
                          [&](int64_t j) {
                            const Task& task = tasks[j];
                            PoolBags(tables[task.table], task.first, task.last);
                          });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradBagPoolF32, Pool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets());
