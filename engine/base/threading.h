// One threading context, created by the CLI (or a test) and passed by reference to everything
// that runs in parallel; no global pools. It wraps a oneTBB task_arena of a fixed size, so that
// `--threads N` means N and the kernels never oversubscribe the machine.
#pragma once

#include <tbb/task_arena.h>

#include <cstddef>
#include <functional>

namespace needle {

class ThreadingContext {
 public:
  // threads <= 0: all hardware threads.
  explicit ThreadingContext(int threads = 0);
  int threads() const { return threads_; }

  // Runs body(begin, end) over [0, n) in chunks of at least `grain`, inside the arena.
  void ParallelFor(size_t n, size_t grain, const std::function<void(size_t, size_t)>& body);

 private:
  int threads_;
  tbb::task_arena arena_;
};

}  // namespace needle
