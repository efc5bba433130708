// Parsing of list-valued option values shared by the subcommands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/cli/options.h"

namespace needle {

std::vector<std::string> SplitComma(const std::string& s);
// "4096,4k,128k,1m" -> tokens (k = 1024, m = 1048576); throws naming `what` and the item.
std::vector<int64_t> ParseTokenLengths(const std::string& s, const std::string& what);
// "1,2,3" -> non-negative int32 ids; throws naming `what` and the item.
std::vector<int32_t> ParseIdList(const std::string& s, const std::string& what);
// The options that shape generated datasets (lengths, depths, samples, seed), for data and eval.
std::vector<OptionSpec> DatasetOptionSpecs();
// The start of a command that takes a TASK first (needle eval, needle data): with no argument or
// --help / -h, prints `usage` and the task list and returns the exit code (2 / 0); with a task,
// returns -1; with another option first, throws naming the command, its usage and the tasks.
int TaskCommandStart(int argc, char** argv, const std::string& cmd, const std::string& usage,
                     const std::string& tasks);

}  // namespace needle
