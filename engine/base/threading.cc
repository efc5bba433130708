#include "engine/base/threading.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <thread>

namespace needle {

namespace {
int ResolveThreads(int threads) {
  if (threads > 0) return threads;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}
}  // namespace

ThreadingContext::ThreadingContext(int threads)
    : threads_(ResolveThreads(threads)), arena_(threads_) {}

void ThreadingContext::ParallelFor(size_t n, size_t grain,
                                   const std::function<void(size_t, size_t)>& body) {
  if (n == 0) return;
  if (grain == 0) grain = 1;
  if (threads_ == 1 || n <= grain) {
    body(0, n);
    return;
  }
  arena_.execute([&] {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, grain),
                      [&](const tbb::blocked_range<size_t>& r) { body(r.begin(), r.end()); });
  });
}

}  // namespace needle
