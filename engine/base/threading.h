// One threading context, created by the CLI (or a test) and passed by reference to everything
// that runs in parallel; no global pools. It wraps a oneTBB task_arena of a fixed size, so that
// `--threads N` means N and the kernels never oversubscribe the machine.
#pragma once

#include <tbb/task_arena.h>
#include <tbb/task_group.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>

namespace needle {

class ThreadingContext {
 public:
  // threads <= 0: all hardware threads.
  explicit ThreadingContext(int threads = 0);
  int threads() const { return threads_; }

  // Runs body(begin, end) over [0, n) in chunks of at least `grain`, inside the arena.
  void ParallelFor(size_t n, size_t grain, const std::function<void(size_t, size_t)>& body);

  // Wakes the arena's workers ahead of a ParallelFor the caller knows is near (behind a short
  // wait for the GPU): each spins until the next ParallelFor begins or max_us have passed, then
  // goes back to oneTBB, which puts it to sleep. A sleeping worker takes tens of microseconds to
  // wake (more in a VM); this hides that behind the wait. Only for waits known to be short: the
  // workers burn their cores meanwhile.
  void Wake(int max_us);
  // Sends Wake's spinners back to oneTBB (to sleep) at once: the work it was for will not come
  // (the hybrid's GPU took every block of the layer).
  void Rest() { epoch_.fetch_add(1, std::memory_order_relaxed); }
  int spinners() const { return spinners_.load(); }  // Wake's, not yet given up (tests)

  // Starts fn on the arena's workers and returns at once, so that the caller can do other work
  // (queue GPU launches) meanwhile; fn may call ParallelFor. Join() waits for it, the caller
  // taking part in its parallel work until it is done, and rethrows what fn threw. One started
  // function at a time; every Start is followed by a Join before the next.
  void Start(std::function<void()> fn);
  void Join();

 private:
  int threads_;
  tbb::task_arena arena_;
  std::atomic<uint64_t> epoch_{0};      // ParallelFor calls begun
  std::atomic<int64_t> wake_until_{0};  // steady-clock ns at which spinners give up
  std::atomic<int> spinners_{0};        // enqueued or spinning
  tbb::task_group started_;             // Start's function
  bool running_ = false;                // between Start and Join
  std::function<void()> started_fn_;    // Start's function with one thread (run by Join)
};

}  // namespace needle
