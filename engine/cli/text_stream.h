// What the text-generating subcommands (generate, ask) show while they run: a prefill progress
// bar on a terminal's stderr, and the answer streamed to stdout as it is decoded, cut at a stop
// string.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#include "engine/tokenizer/tokenizer.h"

namespace needle {

// "prefill [=====>    ] 12288/32768 tok  812 tok/s  25 s left" on a terminal's stderr, for
// prompts that take longer than a second.
class ProgressBar {
 public:
  ProgressBar() : tty_(::isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {}
  void Update(int64_t done, int64_t total) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    if (!tty_ || total <= 1 || s < 1.0) return;
    const int width = 30, filled = static_cast<int>(width * done / total);
    const double rate = done / s;
    std::fprintf(stderr, "\rprefill [%s%s] %lld/%lld tok  %.0f tok/s  %.0f s left ",
                 std::string(filled, '=').c_str(), std::string(width - filled, ' ').c_str(),
                 static_cast<long long>(done), static_cast<long long>(total), rate,
                 (total - done) / std::max(rate, 1e-9));
    if (done == total) std::fprintf(stderr, "\n");
  }

 private:
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

// Tokens decoded to stdout as they come; with a stop string, the text ends before its first
// occurrence, and a tail that could still grow into it is held back until it cannot.
class StopStream {
 public:
  StopStream(const Tokenizer& tok, std::string stop) : dec_(tok, true), stop_(std::move(stop)) {}
  // False once the stop string has been seen (nothing more is written).
  bool Push(int32_t id) {
    pending_ += dec_.Push(id);
    if (stop_.empty()) {
      Emit(pending_);
      pending_.clear();
      return true;
    }
    const size_t at = (text_ + pending_).find(stop_);
    if (at != std::string::npos) {
      Emit((text_ + pending_).substr(text_.size(), at - std::min(at, text_.size())));
      stopped_ = true;
      return false;
    }
    // All but a tail that could still grow into the stop string (whole UTF-8 characters).
    const size_t keep = std::min(pending_.size(), stop_.size() - 1);
    size_t cut = pending_.size() - keep;
    while (cut > 0 && cut < pending_.size() &&
           (static_cast<unsigned char>(pending_[cut]) & 0xC0) == 0x80)
      --cut;
    Emit(pending_.substr(0, cut));
    pending_.erase(0, cut);
    return true;
  }
  // The rest (unless stopped), then a newline.
  void Finish() {
    if (!stopped_) Emit(pending_ + dec_.Flush());
    Emit("\n");
  }
  bool stopped() const { return stopped_; }

 private:
  void Emit(const std::string& s) {
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fflush(stdout);
    text_ += s;
  }
  StreamDecoder dec_;
  std::string stop_, text_, pending_;  // text_: written so far
  bool stopped_ = false;
};

}  // namespace needle
