// Fork detection for share_items (parallel.h).
#include "parallel.h"

#include <pthread.h>

namespace sparse_sam {
namespace {

std::atomic<bool> forked_child{false};

void mark_forked_child() { forked_child.store(true, std::memory_order_relaxed); }

// Registered when the extension loads, so that a fork before the first op call is seen too.
const int atfork_registered = pthread_atfork(nullptr, nullptr, mark_forked_child);

}  // namespace

bool in_forked_child() { return forked_child.load(std::memory_order_relaxed); }

}  // namespace sparse_sam
