#include "datasets/fit_search.h"

#include <algorithm>
#include <cmath>

#include "engine/base/error.h"

namespace needle::datasets {

int64_t LargestFitting(int64_t lo, int64_t budget, const std::function<int64_t(int64_t)>& tokens) {
  int64_t a = lo, ta = tokens(a);
  NEEDLE_CHECK(ta <= budget);
  // Upward: from the last two counts, aim a little past where the budget runs out, until a count
  // exceeds it. [a, b) then brackets the answer: a fits, b does not.
  int64_t pa = a, pta = ta;
  int64_t b = a + 1, tb = tokens(b);
  while (tb <= budget) {
    pa = a, pta = ta, a = b, ta = tb;
    int64_t next = 2 * a + 1;  // (no growth seen yet: double)
    if (ta > pta) {
      const double est = static_cast<double>(a) + static_cast<double>(budget - ta) *
                                                      static_cast<double>(a - pa) /
                                                      static_cast<double>(ta - pta);
      next = std::min(next * 512, static_cast<int64_t>(std::ceil(est + (est - a) / 64 + 1)));
    }
    b = std::max(a + 1, next), tb = tokens(b);
  }
  // Inward: the chord's estimate of the last n that fits, or the middle after a step that left
  // more than half the bracket.
  bool halve = false;
  while (b - a > 1) {
    const int64_t width = b - a;
    int64_t m = a + width / 2;
    if (!halve)
      m = a + static_cast<int64_t>(
                  std::floor(static_cast<double>(budget - ta) * static_cast<double>(width) /
                             static_cast<double>(tb - ta)));
    m = std::clamp(m, a + 1, b - 1);
    const int64_t tm = tokens(m);
    if (tm <= budget)
      a = m, ta = tm;
    else
      b = m, tb = tm;
    halve = !halve && 2 * (b - a) > width;
  }
  return a;
}

}  // namespace needle::datasets
