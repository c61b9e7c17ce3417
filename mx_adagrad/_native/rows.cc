// Row gathers and scatters of RowSparse updates (mx_adagrad.sparse.gather, scatter, add) for the
// XLA CPU backend.
//
//   gather:       out[k] = table[ids[k]]            zeros where ids[k] is outside [0, num_rows)
//   scatter:      table[ids[k]] = rows[k]           in place; ids outside the table are dropped
//   scatter_add:  table[ids[k]] += rows[k]          in place, float32, in order of k
//
// A "row" is everything after the first axis, copied as bytes (gather and scatter work for any
// dtype). These are the jnp.take(mode="fill") and .at[ids].set/.add(mode="drop") of the XLA
// program, bit for bit: copies, and for the add the same float32 sum of the same two numbers in
// the same order. XLA CPU runs gathers and scatters one element at a time with bounds checks on
// every index; a row at a time is one memcpy (or one vectorized add) per row.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Rows {
  int64_t count;  // rows in the table
  int64_t bytes;  // bytes per row
};

// The table's row count and row size, checked against the rows' shape.
bool TableRows(const ffi::AnyBuffer& table, const ffi::AnyBuffer& rows, int64_t n, Rows* out) {
  const auto dims = table.dimensions();
  if (dims.size() == 0 || table.element_type() != rows.element_type()) return false;
  const int64_t count = dims[0];
  const int64_t row_elements =
      count == 0 ? 0 : static_cast<int64_t>(table.element_count()) / count;
  if (static_cast<int64_t>(rows.element_count()) != n * row_elements) return false;
  *out = Rows{count, n == 0 ? 0 : static_cast<int64_t>(rows.size_bytes()) / n};
  return true;
}

// Rows ahead of the one being copied whose table lines are requested early: a table row is a
// random DRAM access, so the copies would otherwise wait for one row at a time.
constexpr int64_t kPrefetchRows = 8;
// Lines of a row requested ahead (the hardware's next-line prefetcher follows a longer row).
constexpr int64_t kPrefetchBytes = 512;

template <typename Id, typename Fn>
ffi::Error ForEachRowOf(const Id* ids, int64_t n, int64_t count, const char* table,
                        int64_t row_bytes, bool write, Fn fn) {
  const int64_t ahead = std::min(row_bytes, kPrefetchBytes);
  for (int64_t k = 0; k < n; ++k) {
    if (k + kPrefetchRows < n) {
      const int64_t next = static_cast<int64_t>(ids[k + kPrefetchRows]);
      if (next >= 0 && next < count) {
        for (int64_t b = 0; b < ahead; b += 64) {
          if (write) {
            __builtin_prefetch(table + next * row_bytes + b, 1);
          } else {
            __builtin_prefetch(table + next * row_bytes + b, 0);
          }
        }
      }
    }
    const int64_t id = static_cast<int64_t>(ids[k]);
    if (id >= 0 && id < count) fn(k, id);
  }
  return ffi::Error::Success();
}

// Calls fn(k, id) for every k whose id is a row of the table, in order of k, with the table's
// rows prefetched (for writing when ``write``).
template <typename Fn>
ffi::Error ForEachRow(const ffi::AnyBuffer& ids, const Rows& shape, const char* table, bool write,
                      Fn fn) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  switch (ids.element_type()) {
    case ffi::DataType::S32:
      return ForEachRowOf(static_cast<const int32_t*>(ids.untyped_data()), n, shape.count, table,
                          shape.bytes, write, fn);
    case ffi::DataType::S64:
      return ForEachRowOf(static_cast<const int64_t*>(ids.untyped_data()), n, shape.count, table,
                          shape.bytes, write, fn);
    default:
      return ffi::Error::InvalidArgument("mx_adagrad: row ids must be int32 or int64");
  }
}

// The table, written in place (XLA aliases the result to the operand; copy if it did not).
char* InPlace(const ffi::AnyBuffer& table, ffi::Result<ffi::AnyBuffer>& out) {
  if (out->untyped_data() != table.untyped_data()) {
    std::memcpy(out->untyped_data(), table.untyped_data(), table.size_bytes());
  }
  return static_cast<char*>(out->untyped_data());
}

ffi::Error Gather(ffi::AnyBuffer table, ffi::AnyBuffer ids, ffi::Result<ffi::AnyBuffer> rows) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  Rows shape;
  if (ids.dimensions().size() != 1 || !TableRows(table, *rows, n, &shape)) {
    return ffi::Error::InvalidArgument("mx_adagrad: gather got mismatched shapes");
  }
  char* out = static_cast<char*>(rows->untyped_data());
  std::memset(out, 0, rows->size_bytes());
  const char* in = static_cast<const char*>(table.untyped_data());
  return ForEachRow(ids, shape, in, false, [&](int64_t k, int64_t id) {
    std::memcpy(out + k * shape.bytes, in + id * shape.bytes, shape.bytes);
  });
}

// kAdd: table[ids[k]] += rows[k] (float32); else table[ids[k]] = rows[k] (any dtype).
template <bool kAdd>
ffi::Error ScatterRows(ffi::AnyBuffer table, ffi::AnyBuffer ids, ffi::AnyBuffer rows,
                       ffi::Result<ffi::AnyBuffer> out) {
  const int64_t n = static_cast<int64_t>(ids.element_count());
  Rows shape;
  if (ids.dimensions().size() != 1 || (kAdd && table.element_type() != ffi::DataType::F32) ||
      !TableRows(table, rows, n, &shape)) {
    return ffi::Error::InvalidArgument("mx_adagrad: scatter got mismatched shapes");
  }
  char* dst = InPlace(table, out);
  const char* src = static_cast<const char*>(rows.untyped_data());
  return ForEachRow(ids, shape, dst, true, [&](int64_t k, int64_t id) {
    if constexpr (kAdd) {
      float* __restrict to = reinterpret_cast<float*>(dst + id * shape.bytes);
      const float* __restrict from = reinterpret_cast<const float*>(src + k * shape.bytes);
      for (int64_t e = 0; e < shape.bytes / static_cast<int64_t>(sizeof(float)); ++e) {
        to[e] += from[e];
      }
    } else {
      std::memcpy(dst + id * shape.bytes, src + k * shape.bytes, shape.bytes);
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MxAdagradGatherRows, Gather,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

#define MX_ADAGRAD_SCATTER_HANDLER(NAME, ADD)                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, ScatterRows<ADD>,        \
                                ffi::Ffi::Bind()               \
                                    .Arg<ffi::AnyBuffer>()     \
                                    .Arg<ffi::AnyBuffer>()     \
                                    .Arg<ffi::AnyBuffer>()     \
                                    .Ret<ffi::AnyBuffer>());

MX_ADAGRAD_SCATTER_HANDLER(MxAdagradScatterRows, false)
MX_ADAGRAD_SCATTER_HANDLER(MxAdagradScatterAddRowsF32, true)
