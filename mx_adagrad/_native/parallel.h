// Work split over the XLA CPU thread pool, shared by the kernels that run on several threads.

#ifndef MX_ADAGRAD_NATIVE_PARALLEL_H_
#define MX_ADAGRAD_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace mx_adagrad {

// Calls fn(i) once for every i in [0, count), on up to `threads` threads of `pool` (the caller
// included). Threads claim the next i in turn, so uneven tasks balance. The caller claims tasks
// too and then waits only for tasks that another thread has claimed (and so is running): a
// helper that the pool starts late finds nothing left and returns without touching fn, so this
// cannot deadlock even when the caller is itself a pool thread. Which thread runs a task never
// changes what it computes: every caller makes its tasks independent.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, int64_t threads, const Fn& fn) {
  threads = std::min({threads, count, pool.num_threads()});
  if (threads <= 1) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto run = [progress, count, &fn] {
    for (int64_t i = progress->next.fetch_add(1); i < count; i = progress->next.fetch_add(1)) {
      fn(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run] { run(); });
  run();
  while (progress->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace mx_adagrad

#endif  // MX_ADAGRAD_NATIVE_PARALLEL_H_
