#include "engine/cuda/host_residual.h"

#include "engine/cuda/cuda_check.h"

namespace needle::cuda {

namespace {

class Residual final : public Backend::HostResidual {
 public:
  Residual(Backend& b, cudaStream_t main, int64_t rows, int64_t cols, int64_t max_rows)
      : b_(b), main_(main), cols_(cols) {
    host_ = b.AllocHost(static_cast<size_t>(rows * cols));
    for (auto& s : slot_) s = BackendBuffer(b, static_cast<size_t>(max_rows * cols));
    NEEDLE_CUDA_CHECK(cudaStreamCreateWithFlags(&load_, cudaStreamNonBlocking));
    NEEDLE_CUDA_CHECK(cudaStreamCreateWithFlags(&store_, cudaStreamNonBlocking));
    for (int k = 0; k < 2; ++k)
      for (cudaEvent_t* e : {&loaded_[k], &stored_[k], &done_[k]})
        NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  }
  ~Residual() override {
    // (Nothing may still read or write the slots or the host rows.)
    cudaStreamSynchronize(main_);
    cudaStreamSynchronize(load_);
    cudaStreamSynchronize(store_);
    for (int k = 0; k < 2; ++k)
      for (cudaEvent_t e : {loaded_[k], stored_[k], done_[k]}) cudaEventDestroy(e);
    cudaStreamDestroy(load_);
    cudaStreamDestroy(store_);
    b_.FreeHost(host_);
  }

  float* Acquire(int64_t s, int64_t n, bool fill, int64_t next_s, int64_t next_n) override {
    int k = -1;
    if (fill && pre_ >= 0 && pre_s_ == s && pre_n_ == n) {
      k = pre_;  // loaded beside the previous micro-batch's work
    } else {
      k = 1 - cur_;
      if (fill) {
        Load(k, s, n);
      } else {  // the caller writes the slot: once its last store has read it
        NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(main_, stored_[k], 0));
      }
    }
    pre_ = -1;
    if (fill) NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(main_, loaded_[k], 0));
    cur_ = k, cur_s_ = s;
    // The next micro-batch into the other slot, beside this one's work (rows that this one will
    // write are not read ahead of that).
    if (next_n > 0 && (next_s + next_n <= s || next_s >= s + n)) {
      Load(1 - k, next_s, next_n);
      pre_ = 1 - k, pre_s_ = next_s, pre_n_ = next_n;
    }
    return slot_[k].get();
  }

  void Release(int64_t s, int64_t n) override {
    NEEDLE_CHECK(cur_ >= 0 && cur_s_ == s);
    const int k = cur_;
    NEEDLE_CUDA_CHECK(cudaEventRecord(done_[k], main_));
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(store_, done_[k], 0));
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(host_ + s * cols_, slot_[k].get(),
                                      static_cast<size_t>(n * cols_) * sizeof(float),
                                      cudaMemcpyDeviceToHost, store_));
    NEEDLE_CUDA_CHECK(cudaEventRecord(stored_[k], store_));
    last_store_ = k;
  }

 private:
  // Rows [s, s + n) into slot k on the load stream, after the slot's last store (which followed
  // the work that used it) and after every store so far (the rows may be among them).
  void Load(int k, int64_t s, int64_t n) {
    NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(load_, stored_[k], 0));
    if (last_store_ >= 0) NEEDLE_CUDA_CHECK(cudaStreamWaitEvent(load_, stored_[last_store_], 0));
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(slot_[k].get(), host_ + s * cols_,
                                      static_cast<size_t>(n * cols_) * sizeof(float),
                                      cudaMemcpyHostToDevice, load_));
    NEEDLE_CUDA_CHECK(cudaEventRecord(loaded_[k], load_));
  }

  Backend& b_;
  cudaStream_t main_, load_ = nullptr, store_ = nullptr;
  int64_t cols_;
  float* host_ = nullptr;  // [rows, cols], page-locked
  BackendBuffer slot_[2];
  // loaded_: slot k's last load; stored_: its last store; done_: the work that used it (before
  // that store). (An event never recorded is waited for as complete.)
  cudaEvent_t loaded_[2] = {}, stored_[2] = {}, done_[2] = {};
  int cur_ = 1, pre_ = -1, last_store_ = -1;  // the slot in use, the one loaded ahead
  int64_t cur_s_ = -1, pre_s_ = -1, pre_n_ = 0;
};

}  // namespace

std::unique_ptr<Backend::HostResidual> MakeHostResidual(Backend& b, cudaStream_t main, int64_t rows,
                                                        int64_t cols, int64_t max_rows) {
  return std::make_unique<Residual>(b, main, rows, cols, max_rows);
}

}  // namespace needle::cuda
