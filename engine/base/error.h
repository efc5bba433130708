// Errors at the boundaries of needle (files, configs, command lines) are exceptions that carry
// the file, the field or tensor, and the offending value; the CLI prints them and exits non-zero.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace needle {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Builds a message from any streamable pieces: Fail("file ", path, ": tensor ", name, " ...").
template <typename... Args>
std::string Concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <typename... Args>
[[noreturn]] void Fail(const Args&... args) {
  throw Error(Concat(args...));
}

// Internal invariant: a violated one is a bug in needle, not bad input, but it must still not
// turn into garbage or a crash in release builds (unlike assert).
[[noreturn]] void InternalError(const char* cond, const char* file, int line);
#define NEEDLE_CHECK(cond)                                           \
  do {                                                               \
    if (!(cond)) ::needle::InternalError(#cond, __FILE__, __LINE__); \
  } while (0)

}  // namespace needle
