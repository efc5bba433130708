#include "engine/cli/options.h"

#include <algorithm>
#include <sstream>

#include "engine/base/error.h"

namespace needle {

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
  specs_.push_back({"help", 'h', OptKind::kFlag, "", "show this help"});
  for (const auto& s : specs_) values_[s.name] = s.kind == OptKind::kFlag ? "0" : s.dflt;
}

const OptionSpec* Options::Find(const std::string& name) const {
  for (const auto& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

bool Options::Parse(int argc, char** argv) {
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
        std::string best;
        size_t best_d = SIZE_MAX;
        for (const auto& s : specs_) {
          size_t d = EditDistance(name, s.name);
          if (d < best_d) best_d = d, best = s.name;
        }
        std::string hint =
            best_d <= std::max<size_t>(2, name.size() / 3) ? " (did you mean --" + best + "?)" : "";
        Fail(command_, ": unknown option '--", name, "'", hint, "; see '", command_, " --help'");
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
      values_[spec->name] = "1";
    } else {
      if (!has_value) {
        if (i + 1 >= argc) Fail(command_, ": option --", spec->name, " needs a value");
        value = argv[++i];
      }
      if (spec->kind == OptKind::kInt) {
        size_t pos = 0;
        try {
          (void)std::stoll(value, &pos);
        } catch (...) {
          pos = 0;
        }
        if (value.empty() || pos != value.size())
          Fail(command_, ": option --", spec->name, " expects an integer, got '", value, "'");
      }
      values_[spec->name] = value;
    }
    set_[spec->name] = true;
  }
  return !Flag("help");
}

std::string Options::Str(const std::string& name) const {
  auto it = values_.find(name);
  NEEDLE_CHECK(it != values_.end());
  return it->second;
}

int64_t Options::Int(const std::string& name) const { return std::stoll(Str(name)); }
bool Options::Flag(const std::string& name) const { return Str(name) == "1"; }
bool Options::IsSet(const std::string& name) const { return set_.count(name) > 0; }

std::string Options::Help() const {
  std::ostringstream os;
  os << "usage: " << command_ << " [options]\n" << summary_ << "\n\noptions:\n";
  for (const auto& s : specs_) {
    std::string left = "  ";
    left += s.short_name ? std::string("-") + s.short_name + ", " : "    ";
    left += "--" + s.name;
    if (s.kind == OptKind::kInt) left += " N";
    if (s.kind == OptKind::kString) left += " VALUE";
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
