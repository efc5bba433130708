#include "engine/cli/options.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include <nlohmann/json.hpp>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"
#include "engine/base/mapped_file.h"

namespace needle {

namespace {
constexpr char kListSep = '\x1f';  // joins a kList option's values
}  // namespace

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] =
          std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1] ? 1 : 0)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

Options::Options(std::string command, std::string summary, std::vector<OptionSpec> specs)
    : command_(std::move(command)), summary_(std::move(summary)), specs_(std::move(specs)) {
  specs_.push_back({"config", 0, OptKind::kString, "",
                    "JSON file of option values (command-line flags override it)"});
  specs_.push_back({"print-config", 0, OptKind::kFlag, "",
                    "print every option's effective value and its source, then exit"});
  specs_.push_back({"help", 'h', OptKind::kFlag, "", "show this help"});
  for (const auto& s : specs_) {
    values_[s.name] = s.kind == OptKind::kFlag ? "0" : s.dflt;
    source_[s.name] = "default";
  }
}

const OptionSpec* Options::Find(const std::string& name) const {
  for (const auto& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

std::string Options::Suggest(const std::string& name) const {
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const auto& s : specs_) {
    const size_t d = EditDistance(name, s.name);
    if (d < best_d) best_d = d, best = s.name;
  }
  return best_d <= std::max<size_t>(2, name.size() / 3) ? best : "";
}

void Options::Set(const OptionSpec& spec, const std::string& value, const std::string& source) {
  if (spec.kind == OptKind::kInt) {
    size_t pos = 0;
    try {
      (void)std::stoll(value, &pos);
    } catch (...) {
      pos = 0;
    }
    if (value.empty() || pos != value.size())
      Fail(command_, ": option --", spec.name, " expects an integer, got '", value, "' (", source,
           ")");
  }
  if (spec.kind == OptKind::kList) {  // values joined by kListSep; a new source starts afresh
    std::string& v = values_[spec.name];
    v = source_.count(spec.name) != 0 && source_[spec.name] == source ? v + kListSep + value
                                                                      : value;
  } else {
    values_[spec.name] = value;
  }
  source_[spec.name] = source;
}

void Options::LoadConfigFile(const std::string& path) {
  nlohmann::json j;
  try {
    j = ParseJsonBounded(ReadTextFile(path));
  } catch (const nlohmann::json::exception& e) {
    Fail(path, ": malformed JSON: ", e.what());
  }
  if (!j.is_object()) Fail(path, ": expected a JSON object of option names and values");
  const std::string source = "config " + path;
  for (auto it = j.begin(); it != j.end(); ++it) {
    std::string key = it.key();
    for (auto& c : key)
      if (c == '_') c = '-';  // accept snake_case keys too
    const OptionSpec* spec = Find(key);
    if (spec == nullptr || key == "config" || key == "help" || key == "print-config") {
      const std::string hint = Suggest(key);
      Fail(path, ": unknown key '", it.key(), "'",
           hint.empty() ? "" : " (did you mean '" + hint + "'?)");
    }
    const auto& v = it.value();
    std::string text;
    if (spec->kind == OptKind::kFlag) {
      if (!v.is_boolean())
        Fail(path, ": key '", it.key(), "' must be true or false (value: ", v.dump(), ")");
      text = v.get<bool>() ? "1" : "0";
    } else if (spec->kind == OptKind::kList && v.is_array()) {
      for (const auto& x : v) {
        if (!x.is_string())
          Fail(path, ": key '", it.key(), "' must be an array of strings (value: ", v.dump(), ")");
        Set(*spec, x.get<std::string>(), source);
      }
      continue;
    } else if (v.is_string()) {
      text = v.get<std::string>();
    } else if (v.is_number_integer()) {
      text = std::to_string(v.get<int64_t>());
    } else if (v.is_number_float() && spec->kind == OptKind::kString) {
      text = v.dump();
    } else {
      Fail(path, ": key '", it.key(), "' has a value of the wrong type (value: ", v.dump(), ")");
    }
    Set(*spec, text, source);
  }
}

bool Options::Parse(int argc, char** argv) {
  // Pass 1: the config file, so that every command-line flag overrides it whatever the order.
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--config" && i + 1 < argc) LoadConfigFile(argv[i + 1]);
    if (arg.rfind("--config=", 0) == 0) LoadConfigFile(arg.substr(9));
  }
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    const OptionSpec* spec = nullptr;
    std::string value;
    bool has_value = false;
    if (arg.rfind("--", 0) == 0) {
      std::string name = arg.substr(2);
      auto eq = name.find('=');
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      spec = Find(name);
      if (spec == nullptr) {
        const std::string hint = Suggest(name);
        Fail(command_, ": unknown option '--", name, "'",
             hint.empty() ? "" : " (did you mean --" + hint + "?)", "; see '", command_,
             " --help'");
      }
    } else if (arg.size() == 2 && arg[0] == '-' && arg[1] != '-') {
      for (const auto& s : specs_)
        if (s.short_name == arg[1]) spec = &s;
      if (spec == nullptr)
        Fail(command_, ": unknown option '", arg, "'; see '", command_, " --help'");
    } else {
      Fail(command_, ": unexpected argument '", arg, "'; see '", command_, " --help'");
    }
    if (spec->kind == OptKind::kFlag) {
      if (has_value) Fail(command_, ": option --", spec->name, " takes no value");
      Set(*spec, "1", "command line");
    } else {
      if (!has_value) {
        if (i + 1 >= argc) Fail(command_, ": option --", spec->name, " needs a value");
        value = argv[++i];
      }
      Set(*spec, value, "command line");
    }
  }
  if (Flag("print-config")) {
    std::fputs(PrintConfig().c_str(), stdout);
    return false;
  }
  return !Flag("help");
}

std::string Options::Source(const std::string& name) const {
  auto it = source_.find(name);
  return it == source_.end() ? "default" : it->second;
}

std::string Options::PrintConfig() const {
  std::ostringstream os;
  for (const auto& s : specs_) {
    if (s.name == "help" || s.name == "print-config" || s.name == "config") continue;
    std::string v = values_.at(s.name);
    if (s.kind == OptKind::kFlag) v = v == "1" ? "true" : "false";
    if (s.kind == OptKind::kList) v = nlohmann::json(List(s.name)).dump();
    os << s.name << " = " << (v.empty() ? "\"\"" : v) << "  (" << Source(s.name) << ")\n";
  }
  return os.str();
}

std::string Options::Str(const std::string& name) const {
  auto it = values_.find(name);
  NEEDLE_CHECK(it != values_.end());
  return it->second;
}

int64_t Options::Int(const std::string& name) const { return std::stoll(Str(name)); }
bool Options::Flag(const std::string& name) const { return Str(name) == "1"; }
std::vector<std::string> Options::List(const std::string& name) const {
  std::vector<std::string> out;
  if (!IsSet(name)) return out;
  const std::string v = Str(name);
  for (size_t at = 0;;) {
    const size_t end = v.find(kListSep, at);
    out.push_back(v.substr(at, end == std::string::npos ? std::string::npos : end - at));
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return out;
}
bool Options::IsSet(const std::string& name) const { return Source(name) != "default"; }

std::string Options::Help() const {
  std::ostringstream os;
  os << "usage: " << command_ << " [options]\n" << summary_ << "\n\noptions:\n";
  for (const auto& s : specs_) {
    std::string left = "  ";
    left += s.short_name ? std::string("-") + s.short_name + ", " : "    ";
    left += "--" + s.name;
    if (s.kind == OptKind::kInt) left += " N";
    if (s.kind == OptKind::kString) left += " VALUE";
    if (s.kind == OptKind::kList) left += " VALUE...";
    os << left;
    if (left.size() < 32)
      os << std::string(32 - left.size(), ' ');
    else
      os << "\n" << std::string(32, ' ');
    os << s.help;
    if (!s.dflt.empty()) os << " (default: " << s.dflt << ")";
    os << "\n";
  }
  return os.str();
}

}  // namespace needle
