// Options, each declared once with its name, value kind, default and help; the same table drives
// parsing, --help, --print-config and error messages. Values layer as
//   defaults  <  the JSON object of --config FILE  <  the command line,
// and each value remembers where it came from. Every subcommand gets --config, --print-config
// and --help. Unknown flags or config keys are errors that suggest the nearest valid name.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace needle {

// kList: a string option that may be given several times (-q A -q B; a config file: an array of
// strings); the command line's values replace the config file's.
enum class OptKind { kString, kInt, kFlag, kList };

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
  std::vector<std::string> List(const std::string& name) const;  // a kList option's values
  bool IsSet(const std::string& name) const;  // given in the config file or on the command line
  std::string Source(const std::string& name) const;  // "default", "config FILE" or "command line"
  std::string Help() const;
  std::string PrintConfig() const;  // every option: name = value  (source)

 private:
  const OptionSpec* Find(const std::string& name) const;
  std::string Suggest(const std::string& name) const;
  void Set(const OptionSpec& spec, const std::string& value, const std::string& source);
  void LoadConfigFile(const std::string& path);
  std::string command_, summary_;
  std::vector<OptionSpec> specs_;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::string> source_;
};

// Edit distance, for "did you mean" suggestions.
size_t EditDistance(const std::string& a, const std::string& b);

}  // namespace needle
