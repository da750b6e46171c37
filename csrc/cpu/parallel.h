// Work sharing for the CPU ops that never waits for a thread that has not started.
//
// A fork-join region (at::parallel_for, OpenMP) ends in a barrier that every thread of the team must
// reach. When other processes keep the cores busy, a worker may not be scheduled for a whole time
// slice, and the caller waits for it even when it has already done all the work itself: on a shared
// 2-core machine that turned a 0.2 ms swap into 20 ms. Here the caller works through the items too and
// waits only for items a helper has actually taken; a helper that starts late finds nothing left.
// In a forked child (a DataLoader worker) torch's inter-op pool is unusable: its threads are gone and
// signalling its condition variable can block forever, so there the caller does all the work.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace sparse_sam {

// True in a process forked from the one that loaded the extension (csrc/cpu/parallel.cpp).
bool in_forked_child();

// Runs f(i) for every i in [0, n): on the calling thread and on up to at::get_num_threads() - 1
// helpers from torch's inter-op pool, each taking the next item as it finishes one (list costly items
// first). Returns when every item is done; an exception from any item is rethrown here.
template <typename F>
void share_items(int64_t n, const F& f) {
  const int64_t helpers = std::min<int64_t>(n, at::get_num_threads()) - 1;
  if (helpers <= 0 || at::in_parallel_region() || in_forked_child()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  // Shared with the helpers, which may start after this call has returned: they then only read the
  // counter, find it past n, and drop their reference. f is called only for an item taken before the
  // caller saw every item done, so it is still alive.
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const F* f = nullptr;
    std::mutex mu;
    std::exception_ptr error;
    void work() {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next.fetch_add(1, std::memory_order_relaxed)) {
        try {
          (*f)(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu);
          if (!error) error = std::current_exception();
        }
        done.fetch_add(1, std::memory_order_release);  // the item's writes happen before this
      }
    }
  };
  auto st = std::make_shared<State>();
  st->n = n;
  st->f = &f;
  for (int64_t h = 0; h < helpers; ++h) at::launch([st] { st->work(); });
  st->work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  if (st->error) std::rethrow_exception(st->error);
}

}  // namespace sparse_sam
