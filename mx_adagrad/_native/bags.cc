// Pooled lookups of embedding bags (mx_adagrad.bags) for the XLA CPU backend: every table's bags
// in one call, on the threads of XLA's pool; and the bag and scale of each id of Bags given by
// offsets (BagTerms, at the end).
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
constexpr int64_t kPrefetchIds = 32;

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
  for (int64_t b = first; b < last; ++b) {
    float* __restrict out = t.pooled + b * width;
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(width));
    const int64_t begin = Offset(t, b), end = std::max(begin, Offset(t, b + 1));
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchIds < t.n) {
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

template <typename Id, typename Offset>
void Terms(const Id* ids, int64_t n, const Offset* offsets, int64_t bags, const float* weights,
           int64_t num_rows, bool mean, int32_t* bag, float* scale) {
  // bag[i]: how many of offsets[1..bags] are <= i (a search of the sorted offsets, walked).
  int64_t b = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (b < bags && static_cast<int64_t>(offsets[b + 1]) <= i) ++b;
    bag[i] = static_cast<int32_t>(b);
  }
  auto valid = [&](int64_t i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    return id >= 0 && id < num_rows;
  };
  if (!mean) {
    for (int64_t i = 0; i < n; ++i) scale[i] = valid(i) ? (weights ? weights[i] : 1.0f) : 0.0f;
    return;
  }
  std::vector<int32_t> count(static_cast<size_t>(bags) + 1, 0);
  for (int64_t i = 0; i < n; ++i) count[bag[i]] += valid(i) ? 1 : 0;
  for (int64_t i = 0; i < n; ++i) {
    // A position past the last bag takes the last bag's count, as the XLA program clamps.
    const int32_t c = count[std::min<int64_t>(bag[i], std::max<int64_t>(bags - 1, 0))];
    scale[i] = valid(i) ? 1.0f / static_cast<float>(std::max(c, 1)) : 0.0f;
  }
}

template <typename Id>
ffi::Error TermsFor(const ffi::AnyBuffer& ids, const ffi::AnyBuffer& offsets, const float* weights,
                    int64_t num_rows, bool mean, int32_t* bag, float* scale) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  const int64_t bags = static_cast<int64_t>(offsets.element_count()) - 1;
  const Id* id = static_cast<const Id*>(ids.untyped_data());
  if (offsets.element_type() == ffi::DataType::S64) {
    Terms(id, n, static_cast<const int64_t*>(offsets.untyped_data()), bags, weights, num_rows,
          mean, bag, scale);
  } else {
    Terms(id, n, static_cast<const int32_t*>(offsets.untyped_data()), bags, weights, num_rows,
          mean, bag, scale);
  }
  return ffi::Error::Success();
}

// Arguments: ids s32[n] or s64[n], offsets s32[bags + 1] or s64[bags + 1], weights f32[n] or
// f32[0] (none). Results: bag s32[n], scale f32[n]. Attributes: num_rows, mean (1 or 0).
//   bag[i]   = the number of offsets[1:] <= i   (jnp.searchsorted(offsets[1:], i, side="right"))
//   scale[i] = 0 where ids[i] is padding; else weights[i] (1 without weights), or with mean
//              1 / (the count of non-padding ids of bag[i])
ffi::Error BagTerms(ffi::AnyBuffer ids, ffi::AnyBuffer offsets, ffi::Buffer<ffi::F32> weights,
                    ffi::Result<ffi::Buffer<ffi::S32>> bag, ffi::Result<ffi::Buffer<ffi::F32>> scale,
                    int64_t num_rows, int64_t mean) {
  const size_t n = ids.element_count();
  if (!IsIndex(ids) || !IsIndex(offsets) || offsets.element_count() < 1 ||
      (weights.element_count() != 0 && weights.element_count() != n) ||
      bag->element_count() != n || scale->element_count() != n) {
    return ffi::Error::InvalidArgument("mx_adagrad: bag terms got mismatched operands");
  }
  const float* w = weights.element_count() == 0 ? nullptr : weights.typed_data();
  if (ids.element_type() == ffi::DataType::S64) {
    return TermsFor<int64_t>(ids, offsets, w, num_rows, mean != 0, bag->typed_data(),
                             scale->typed_data());
  }
  return TermsFor<int32_t>(ids, offsets, w, num_rows, mean != 0, bag->typed_data(),
                           scale->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradBagTermsF32, BagTerms,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_rows")
                                  .Attr<int64_t>("mean"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradBagPoolF32, Pool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets());
