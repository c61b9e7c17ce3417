// Sparse gradients summed into the rows they touch, shared by the coalesce kernel (coalesce.cc)
// and the one-pass sparse step (sparse_step.cc).
//
// A sparse gradient is n terms, term p adding scale[p] * values[bag[p]] to row ids[p]:
//
//   RowSparse (mx_adagrad.RowSparse)   bag[p] = p, scale[p] = 1     values: (n, width)
//   bags      (mx_adagrad.BagGrad)     the bag of id p, its scale  values: (bags, width)
//
// Summed, as mx_adagrad.sparse.coalesce and mx_adagrad.bags define it, row r receives its
// terms in order of position, starting from +0.0, each product rounded before it is added:
//
//   row[r] = ((0 + scale[p1] * values[bag[p1]]) + scale[p2] * values[bag[p2]]) + ...
//
// for p1 < p2 < ... the positions with ids[p] == r. Ids outside [0, num_rows) (padding) and
// terms whose bag is outside [0, bags) add nothing. A gradient of a single position is the
// exception: its row is its term (see Terms::single).

#ifndef MX_ADAGRAD_NATIVE_GROUPS_H_
#define MX_ADAGRAD_NATIVE_GROUPS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace mx_adagrad {

constexpr int kRadixBits = 11;
constexpr uint64_t kRadix = uint64_t{1} << kRadixBits;

// The positions of a gradient's terms grouped by row, rows ascending, positions ascending in
// each group: group k is row unique[k], positions order[start[k]], ..., order[start[k + 1] - 1].
struct Groups {
  std::vector<int64_t> unique;
  std::vector<int64_t> start;
  std::vector<int64_t> order;
  // Scratch of the sort, kept to reuse its memory.
  std::vector<uint64_t> keys, keys_tmp;
  std::vector<size_t> count;

  int64_t size() const { return static_cast<int64_t>(unique.size()); }
};

// A Groups taken from a process-wide free list for the length of a call and given back after:
// its buffers keep their memory from call to call, whichever of XLA's threads makes the call
// (fresh buffers of this size come from mmap, and their first touch costs page faults that
// take longer than the sort itself).
class LeasedGroups {
 public:
  LeasedGroups() {
    std::lock_guard<std::mutex> lock(Mutex());
    auto& free = Free();
    if (free.empty()) {
      groups_ = std::make_unique<Groups>();
    } else {
      groups_ = std::move(free.back());
      free.pop_back();
    }
  }
  ~LeasedGroups() {
    if (!groups_) return;
    std::lock_guard<std::mutex> lock(Mutex());
    Free().push_back(std::move(groups_));
  }
  LeasedGroups(LeasedGroups&&) = default;
  LeasedGroups& operator=(LeasedGroups&&) = default;
  Groups& operator*() { return *groups_; }
  Groups* get() { return groups_.get(); }

 private:
  static std::mutex& Mutex() {
    static std::mutex mutex;
    return mutex;
  }
  static std::vector<std::unique_ptr<Groups>>& Free() {
    static std::vector<std::unique_ptr<Groups>> free;
    return free;
  }
  std::unique_ptr<Groups> groups_;
};

// Rows and positions are packed in 32 bits each: tables and gradients must stay below this.
constexpr int64_t kMaxGrouped = (int64_t{1} << 32) - 1;

// Groups the terms of ids[0, n): a stable least-significant-digit radix sort of the pairs (row,
// position) by row, packed in one 64-bit word each (row above, position below), kRadixBits bits a
// pass, as many passes as num_rows needs, every pass's histogram counted in one first pass.
// Padding terms take the row num_rows: they sort after every row and are cut off at the end.
template <typename Id>
void GroupIds(const Id* ids, int64_t n, int64_t num_rows, const int32_t* bag, int64_t bags,
              Groups& g) {
  const size_t m = static_cast<size_t>(n);
  g.keys.resize(m);
  g.keys_tmp.resize(m);
  for (int64_t p = 0; p < n; ++p) {
    const int64_t id = static_cast<int64_t>(ids[p]);
    const bool valid =
        id >= 0 && id < num_rows && (bag == nullptr || (bag[p] >= 0 && bag[p] < bags));
    g.keys[p] = (static_cast<uint64_t>(valid ? id : num_rows) << 32) | static_cast<uint64_t>(p);
  }
  int passes = 0;
  while (passes * kRadixBits < 32 && (static_cast<uint64_t>(num_rows) >> (passes * kRadixBits))) {
    ++passes;
  }
  g.count.assign(static_cast<size_t>(passes) * kRadix, 0);
  for (uint64_t k : g.keys) {
    for (int d = 0; d < passes; ++d) ++g.count[d * kRadix + ((k >> (32 + d * kRadixBits)) & (kRadix - 1))];
  }
  for (int d = 0; d < passes; ++d) {
    size_t* place = g.count.data() + d * kRadix;
    size_t total = 0;
    for (size_t b = 0; b < kRadix; ++b) {
      const size_t here = place[b];
      place[b] = total;
      total += here;
    }
    const int shift = 32 + d * kRadixBits;
    for (uint64_t k : g.keys) g.keys_tmp[place[(k >> shift) & (kRadix - 1)]++] = k;
    g.keys.swap(g.keys_tmp);
  }
  g.unique.clear();
  g.start.clear();
  g.order.resize(m);
  uint64_t previous = ~uint64_t{0};
  size_t j = 0;
  for (; j < m; ++j) {
    const uint64_t row = g.keys[j] >> 32;
    if (row == static_cast<uint64_t>(num_rows)) break;  // the padding, last
    if (row != previous) {
      g.unique.push_back(static_cast<int64_t>(row));
      g.start.push_back(static_cast<int64_t>(j));
      previous = row;
    }
    g.order[j] = static_cast<int64_t>(g.keys[j] & 0xffffffffu);
  }
  g.order.resize(j);
  g.start.push_back(static_cast<int64_t>(j));
}

// Where the terms' values come from: values (rows of `width` floats), and per position its bag
// (nullptr: the position itself) and its scale (nullptr: 1). `single`: the gradient has one
// position in all, whose row is then its term itself, not 0 + the term (XLA's segment-sum of one
// slot is a copy: it keeps a -0.0).
struct Terms {
  const float* values;
  const int32_t* bag;
  const float* scale;
  int64_t width;
  bool single = false;
};

// Terms ahead of the one being added whose value rows are requested early.
constexpr int64_t kPrefetchTerms = 8;

// out[0, width) = the sum of group k's terms (see the top).
inline void SumGroup(const Terms& t, const Groups& g, int64_t k, float* __restrict out) {
  const int64_t width = t.width;
  std::memset(out, 0, sizeof(float) * static_cast<size_t>(width));
  const int64_t begin = g.start[k], end = g.start[k + 1];
  if (t.single) {
    const int64_t p = g.order[begin];
    const float* __restrict in = t.values + (t.bag ? t.bag[p] : p) * width;
    const float s = t.scale != nullptr ? t.scale[p] : 1.0f;
    for (int64_t e = 0; e < width; ++e) out[e] = t.scale != nullptr ? s * in[e] : in[e];
    return;
  }
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetchTerms < end) {
      const int64_t ahead = g.order[j + kPrefetchTerms];
      __builtin_prefetch(t.values + (t.bag ? t.bag[ahead] : ahead) * width);
    }
    const int64_t p = g.order[j];
    const float* __restrict in = t.values + (t.bag ? t.bag[p] : p) * width;
    if (t.scale != nullptr) {
      const float s = t.scale[p];
      for (int64_t e = 0; e < width; ++e) out[e] += s * in[e];
    } else {
      for (int64_t e = 0; e < width; ++e) out[e] += in[e];
    }
  }
}

}  // namespace mx_adagrad

#endif  // MX_ADAGRAD_NATIVE_GROUPS_H_
