// Command-line options, each declared once with its name, value kind, default and help; the
// same table drives parsing, --help and error messages. (The layered configuration issue adds a
// JSON config file as a middle layer between these defaults and the command line.)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace needle {

enum class OptKind { kString, kInt, kFlag };

struct OptionSpec {
  std::string name;  // long name without dashes, e.g. "max-new-tokens"
  char short_name;   // 0 for none
  OptKind kind;
  std::string dflt;  // default, as text ("" for none)
  std::string help;
};

class Options {
 public:
  Options(std::string command, std::string summary, std::vector<OptionSpec> specs);

  // Parses argv; throws Error for an unknown option (suggesting the nearest name), a missing or
  // malformed value, or a stray positional argument. Returns false when --help was given.
  bool Parse(int argc, char** argv);

  std::string Str(const std::string& name) const;
  int64_t Int(const std::string& name) const;
  bool Flag(const std::string& name) const;
  bool IsSet(const std::string& name) const;  // given on the command line
  std::string Help() const;

 private:
  const OptionSpec* Find(const std::string& name) const;
  std::string command_, summary_;
  std::vector<OptionSpec> specs_;
  std::map<std::string, std::string> values_;
  std::map<std::string, bool> set_;
};

// Edit distance, for "did you mean" suggestions.
size_t EditDistance(const std::string& a, const std::string& b);

}  // namespace needle
