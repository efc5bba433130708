#include "engine/base/error.h"

namespace needle {

void InternalError(const char* cond, const char* file, int line) {
  throw Error(Concat("internal error: check '", cond, "' failed at ", file, ":", line));
}

}  // namespace needle
