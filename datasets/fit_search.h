// How many units (noise lines, essay words, key-value pairs) of haystack fit a prompt into a
// token budget: the generators' one search (infinitebench.cc, ruler.cc).
#pragma once

#include <cstdint>
#include <functional>

namespace needle::datasets {

// The largest n >= lo with tokens(n) <= budget, for counts that grow with n; tokens(lo) <=
// budget is the caller's to check. Each count tokenises a whole prompt (a 1M-token one takes
// about a second), and the counts grow about linearly with n, so the search extrapolates and
// interpolates on them (a secant step, or a halving step after one that left more than half the
// bracket) rather than doubling and halving: about 8 counts for a 1M-token prompt instead of
// about 40. For counts that grow with n it returns what doubling and halving return.
int64_t LargestFitting(int64_t lo, int64_t budget, const std::function<int64_t(int64_t)>& tokens);

}  // namespace needle::datasets
