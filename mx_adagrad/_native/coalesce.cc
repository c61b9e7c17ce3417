// The duplicate-row sum of a sparse gradient (mx_adagrad.sparse.coalesce) for the XLA CPU
// backend: a RowSparse's rows, or the terms of a BagGrad (groups.h), summed per row.
//
//   ids  = the distinct ids in [0, num_rows), ascending, then num_rows in the remaining slots
//   rows[k] = the sum of the terms of ids[k], in order of position from +0.0   (groups.h)
//
// Padding slots get zero rows. That is the XLA program of coalesce bit for bit: jnp.unique gives
// the same ids, and XLA CPU's segment_sum is a scatter-add that visits the positions in order,
// starting from +0.0 (tests/test_native.py compares the two). XLA CPU sorts with a second operand
// (the positions that unique and argsort need) about seven times slower than with one; here a
// radix sort of (id, position) pairs takes a few microseconds for a few thousand lookups.

#include <cstdint>
#include <cstring>

#include "groups.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mx_adagrad::Groups;
using mx_adagrad::Terms;

template <typename Id>
void CoalesceIds(const Id* ids, Id* ids_out, const Terms& terms, int64_t bags, float* rows_out,
                 int64_t n, int64_t num_rows) {
  mx_adagrad::LeasedGroups leased;
  Groups& groups = *leased;
  mx_adagrad::GroupIds(ids, n, num_rows, terms.bag, bags, groups);
  const int64_t count = groups.size();
  for (int64_t k = 0; k < count; ++k) {
    ids_out[k] = static_cast<Id>(groups.unique[k]);
    mx_adagrad::SumGroup(terms, groups, k, rows_out + k * terms.width);
  }
  for (int64_t k = count; k < n; ++k) ids_out[k] = static_cast<Id>(num_rows);
  std::memset(rows_out + count * terms.width, 0,
              sizeof(float) * static_cast<size_t>((n - count) * terms.width));
}

ffi::Error Dispatch(const ffi::AnyBuffer& ids, ffi::Result<ffi::AnyBuffer>& ids_out,
                    const Terms& terms, int64_t bags, float* rows_out, int64_t num_rows) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  if (n == 0) return ffi::Error::Success();
  if (n >= mx_adagrad::kMaxGrouped || num_rows >= mx_adagrad::kMaxGrouped) {
    return ffi::Error::InvalidArgument("mx_adagrad: coalesce takes fewer than 2**32 - 1 rows");
  }
  switch (ids.element_type()) {
    case ffi::DataType::S32:
      CoalesceIds(static_cast<const int32_t*>(ids.untyped_data()),
                  static_cast<int32_t*>(ids_out->untyped_data()), terms, bags, rows_out, n,
                  num_rows);
      return ffi::Error::Success();
    case ffi::DataType::S64:
      CoalesceIds(static_cast<const int64_t*>(ids.untyped_data()),
                  static_cast<int64_t*>(ids_out->untyped_data()), terms, bags, rows_out, n,
                  num_rows);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("mx_adagrad: coalesce ids must be int32 or int64");
  }
}

bool IdsMatch(const ffi::AnyBuffer& ids, ffi::Result<ffi::AnyBuffer>& ids_out) {
  return ids.dimensions().size() == 1 && ids_out->element_type() == ids.element_type() &&
         ids_out->element_count() == ids.element_count();
}

// Arguments: ids s32[n] or s64[n], values f32[n, ...]. Results: ids like the argument, rows like
// values. Attribute: num_rows.
ffi::Error Coalesce(ffi::AnyBuffer ids, ffi::Buffer<ffi::F32> values,
                    ffi::Result<ffi::AnyBuffer> ids_out, ffi::Result<ffi::Buffer<ffi::F32>> rows_out,
                    int64_t num_rows) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  if (!IdsMatch(ids, ids_out) || rows_out->element_count() != values.element_count() ||
      (n > 0 && values.element_count() % n != 0)) {
    return ffi::Error::InvalidArgument("mx_adagrad: coalesce got mismatched shapes");
  }
  const int64_t width = n == 0 ? 0 : static_cast<int64_t>(values.element_count()) / n;
  const Terms terms{values.typed_data(), nullptr, nullptr, width, n == 1};
  return Dispatch(ids, ids_out, terms, n, rows_out->typed_data(), num_rows);
}

// Arguments: ids s32[n] or s64[n], bag s32[n], scale f32[n], bag_grads f32[bags, width].
// Results: ids like the argument, rows f32[n, width]. Attribute: num_rows.
ffi::Error CoalesceBags(ffi::AnyBuffer ids, ffi::Buffer<ffi::S32> bag, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bag_grads, ffi::Result<ffi::AnyBuffer> ids_out,
                        ffi::Result<ffi::Buffer<ffi::F32>> rows_out, int64_t num_rows) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  const auto dims = bag_grads.dimensions();
  if (!IdsMatch(ids, ids_out) || dims.size() != 2 ||
      static_cast<int64_t>(bag.element_count()) != n ||
      static_cast<int64_t>(scale.element_count()) != n ||
      static_cast<int64_t>(rows_out->element_count()) != n * dims[1]) {
    return ffi::Error::InvalidArgument("mx_adagrad: bag coalesce got mismatched shapes");
  }
  const Terms terms{bag_grads.typed_data(), bag.typed_data(), scale.typed_data(), dims[1], n == 1};
  return Dispatch(ids, ids_out, terms, dims[0], rows_out->typed_data(), num_rows);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradCoalesceF32, Coalesce,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradCoalesceBagsF32, CoalesceBags,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_rows"));
