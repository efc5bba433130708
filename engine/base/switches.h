// Comparison switches: environment variables that turn a measured choice off (or force one) so
// that a benchmark can run both sides in one build. Each caller reads its switch once.
#pragma once

#include <cstdlib>

namespace needle {

// The switch `name` as a number (atoi), `unset` when it is not set.
inline int EnvSwitch(const char* name, int unset) {
  const char* e = std::getenv(name);
  return e == nullptr ? unset : std::atoi(e);
}

// Whether the switch `name` leaves its choice on: unset, or set to anything but 0.
inline bool EnvOnUnlessZero(const char* name) { return EnvSwitch(name, 1) != 0; }

}  // namespace needle
