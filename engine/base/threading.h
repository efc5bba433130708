// One threading context, created by the CLI (or a test) and passed by reference to everything
// that runs in parallel; no global pools. It wraps a oneTBB task_arena of a fixed size, so that
// `--threads N` means N and the kernels never oversubscribe the machine.
#pragma once

#include <tbb/task_arena.h>
#include <tbb/task_group.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>

namespace needle {

class ThreadingContext {
 public:
  // threads <= 0: all hardware threads.
  explicit ThreadingContext(int threads = 0);
  // Waits for Wake's spinners to leave (each refers to this context, and one enqueued on a busy
  // machine may not even have started), after sending them back at once.
  ~ThreadingContext();
  ThreadingContext(const ThreadingContext&) = delete;
  ThreadingContext& operator=(const ThreadingContext&) = delete;
  int threads() const { return threads_; }

  // Runs body(begin, end) over [0, n) in chunks of at least `grain`, inside the arena.
  void ParallelFor(size_t n, size_t grain, const std::function<void(size_t, size_t)>& body);

  // Wakes the arena's workers ahead of the ParallelFor calls the caller knows are near (behind a
  // short wait for the GPU): each spins until Rest(), a Start, or max_us have passed, then goes
  // back to oneTBB, which puts it to sleep. A sleeping worker takes tens of microseconds to wake
  // (more in a VM); this hides that behind the wait. While they spin they are a team: a
  // ParallelFor hands them its chunks through one atomic counter, without oneTBB's tasks and
  // their stealing (a few microseconds a call, which the hybrid's small per-layer folds feel),
  // and they stay for the next one. Only for waits known to be short, ended by Rest(): the
  // workers burn their cores meanwhile.
  void Wake(int max_us);
  // Sends Wake's spinners back to oneTBB (to sleep) at once: the work they were for is done, or
  // will not come (the hybrid's GPU took every block of the layer).
  void Rest() { epoch_.fetch_add(1, std::memory_order_relaxed); }
  int spinners() const { return spinners_.load(); }  // Wake's, not yet given up (tests)

  // Starts fn on the arena's workers and returns at once, so that the caller can do other work
  // (queue GPU launches) meanwhile; fn may call ParallelFor. Join() waits for it, the caller
  // taking part in its parallel work until it is done, and rethrows what fn threw. One started
  // function at a time; every Start is followed by a Join before the next.
  void Start(std::function<void()> fn);
  void Join();

 private:
  // The team's job (one at a time: a ParallelFor that finds it taken goes through oneTBB).
  void RunOnTeam(size_t n, size_t grain, const std::function<void(size_t, size_t)>& body);
  void ServeTeam();  // a spinner (or the caller): takes the open job's chunks until none is left

  int threads_;
  tbb::task_arena arena_;
  bool team_on_ = true;                  // NEEDLE_THREADS_TEAM (threading.cc)
  std::atomic<bool> team_taken_{false};  // a caller's job is (being) published or open
  std::atomic<bool> team_open_{false};   // the job's fields below are valid to serve
  std::atomic<int> team_inside_{0};      // servers that may read the job's fields
  const std::function<void(size_t, size_t)>* team_body_ = nullptr;
  size_t team_n_ = 0, team_chunk_ = 1;
  std::atomic<size_t> team_next_{0};  // first index not yet taken
  std::atomic<size_t> team_done_{0};  // indices finished
  std::atomic<bool> team_failed_{false};
  std::exception_ptr team_error_;        // the first exception a chunk threw (team_failed_ first)
  std::atomic<uint64_t> epoch_{0};       // ParallelFor calls begun
  std::atomic<int64_t> wake_until_{0};   // steady-clock ns at which spinners give up
  std::atomic<int> spinners_{0};         // enqueued or spinning
  std::atomic<uint64_t> wake_epoch_{0};  // the epoch the last Wake's spinners serve
  tbb::task_group started_;              // Start's function
  bool running_ = false;                 // between Start and Join
  std::function<void()> started_fn_;     // Start's function with one thread (run by Join)
};

}  // namespace needle
