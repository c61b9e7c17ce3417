// The duplicate-row sum of a RowSparse gradient (mx_adagrad.sparse.coalesce) for the XLA CPU
// backend, in one pass over the rows.
//
// Given n row ids (int32 or int64, any order, duplicates allowed) and n float32 rows:
//
//   ids  = the distinct ids in [0, num_rows), ascending, then num_rows in the remaining slots
//   rows[k] = ((0 + values[i1]) + values[i2]) + ...   for i1 < i2 < ... the positions of ids[k]
//
// Padding slots get zero rows; ids outside [0, num_rows) are dropped. That is the XLA program of
// coalesce bit for bit: jnp.unique gives the same ids, and XLA CPU's segment_sum is a scatter-add
// that visits the positions in order, starting from +0.0 (tests/test_native.py compares the two).
// XLA CPU sorts with a second operand (the positions that unique and argsort need) about seven
// times slower than with one; here a stable radix sort of (id, position) pairs takes a few
// microseconds for a few thousand lookups, and the rows are then read once, in order.

#include <cstdint>
#include <cstring>
#include <vector>

#include "coalesce.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename Id>
ffi::Error CoalesceIds(const Id* ids, Id* ids_out, const float* values, float* rows_out, int64_t n,
                       int64_t width, int64_t num_rows) {
  std::vector<int64_t> unique;
  mx_adagrad::SumDuplicates(ids, n, num_rows, values, width, unique, rows_out);
  const int64_t count = static_cast<int64_t>(unique.size());
  for (int64_t k = 0; k < count; ++k) ids_out[k] = static_cast<Id>(unique[k]);
  for (int64_t k = count; k < n; ++k) ids_out[k] = static_cast<Id>(num_rows);
  std::memset(rows_out + count * width, 0, sizeof(float) * static_cast<size_t>((n - count) * width));
  return ffi::Error::Success();
}

// Arguments: ids s32[n] or s64[n], values f32[n, ...]. Results: ids like the argument, rows like
// values. Attribute: num_rows.
ffi::Error Coalesce(ffi::AnyBuffer ids, ffi::Buffer<ffi::F32> values,
                    ffi::Result<ffi::AnyBuffer> ids_out, ffi::Result<ffi::Buffer<ffi::F32>> rows_out,
                    int64_t num_rows) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  if (ids.dimensions().size() != 1 || ids_out->element_type() != ids.element_type() ||
      ids_out->element_count() != ids.element_count() ||
      rows_out->element_count() != values.element_count() ||
      (n > 0 && values.element_count() % n != 0)) {
    return ffi::Error::InvalidArgument("mx_adagrad: coalesce got mismatched shapes");
  }
  if (n == 0) return ffi::Error::Success();
  const int64_t width = static_cast<int64_t>(values.element_count()) / n;
  switch (ids.element_type()) {
    case ffi::DataType::S32:
      return CoalesceIds(static_cast<const int32_t*>(ids.untyped_data()),
                         static_cast<int32_t*>(ids_out->untyped_data()), values.typed_data(),
                         rows_out->typed_data(), n, width, num_rows);
    case ffi::DataType::S64:
      return CoalesceIds(static_cast<const int64_t*>(ids.untyped_data()),
                         static_cast<int64_t*>(ids_out->untyped_data()), values.typed_data(),
                         rows_out->typed_data(), n, width, num_rows);
    default:
      return ffi::Error::InvalidArgument("mx_adagrad: coalesce ids must be int32 or int64");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradCoalesceF32, Coalesce,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_rows"));
