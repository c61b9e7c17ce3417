// The duplicate-row sum of a RowSparse gradient, shared by the coalesce kernel (coalesce.cc) and
// the sparse one-pass step (sparse_step.cc). See coalesce.cc for what it matches.

#ifndef MX_ADAGRAD_NATIVE_COALESCE_H_
#define MX_ADAGRAD_NATIVE_COALESCE_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mx_adagrad {

constexpr int kRadixBits = 11;
constexpr uint64_t kRadix = uint64_t{1} << kRadixBits;

// Sorts `keys` (with `order`, the positions they came from) by key, stably, with least-significant
// digit passes of kRadixBits bits, as many as the largest key needs.
inline void RadixSort(std::vector<uint64_t>& keys, std::vector<int64_t>& order) {
  const size_t n = keys.size();
  uint64_t largest = 0;
  for (uint64_t k : keys) largest = std::max(largest, k);
  std::vector<uint64_t> keys_tmp(n);
  std::vector<int64_t> order_tmp(n);
  std::vector<size_t> count(kRadix);
  for (int shift = 0; shift < 64 && (largest >> shift) != 0; shift += kRadixBits) {
    std::fill(count.begin(), count.end(), 0);
    for (uint64_t k : keys) ++count[(k >> shift) & (kRadix - 1)];
    size_t total = 0;
    for (size_t& c : count) {
      const size_t here = c;
      c = total;
      total += here;
    }
    for (size_t i = 0; i < n; ++i) {
      const size_t to = count[(keys[i] >> shift) & (kRadix - 1)]++;
      keys_tmp[to] = keys[i];
      order_tmp[to] = order[i];
    }
    keys.swap(keys_tmp);
    order.swap(order_tmp);
  }
}

// Sums the rows of duplicate ids: on return ``unique`` holds the distinct ids in [0, num_rows),
// ascending, and rows[k * width, (k + 1) * width) the sum of the rows of unique[k], added in order
// of position to +0.0. ``rows`` must hold n * width floats; the first unique.size() rows are
// written, the others are left as they were. Ids outside [0, num_rows) are dropped.
template <typename Id>
void SumDuplicates(const Id* ids, int64_t n, int64_t num_rows, const float* values, int64_t width,
                   std::vector<int64_t>& unique, float* rows) {
  std::vector<uint64_t> keys;
  std::vector<int64_t> order;
  keys.reserve(n);
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    if (id >= 0 && id < num_rows) {
      keys.push_back(static_cast<uint64_t>(id));
      order.push_back(i);
    }
  }
  RadixSort(keys, order);
  // Each valid position's slot: the rank of its id among the distinct ids.
  std::vector<int64_t> slot_of(n, -1);
  unique.clear();
  for (size_t j = 0; j < keys.size(); ++j) {
    if (j == 0 || keys[j] != keys[j - 1]) unique.push_back(static_cast<int64_t>(keys[j]));
    slot_of[order[j]] = static_cast<int64_t>(unique.size()) - 1;
  }
  // The values are read once, in order (a stream the hardware prefetches), and added to their
  // slot's row; each row thus sums its duplicates in order of position.
  std::memset(rows, 0, sizeof(float) * unique.size() * static_cast<size_t>(width));
  for (int64_t i = 0; i < n; ++i) {
    if (slot_of[i] < 0) continue;
    float* __restrict out = rows + slot_of[i] * width;
    const float* __restrict in = values + i * width;
    for (int64_t e = 0; e < width; ++e) out[e] += in[e];
  }
}

}  // namespace mx_adagrad

#endif  // MX_ADAGRAD_NATIVE_COALESCE_H_
