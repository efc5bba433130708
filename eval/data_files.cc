#include "eval/data_files.h"

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"

namespace needle::eval {

using json = nlohmann::json;

namespace {
// Reads one line (without its '\n') into *line, refusing lines past kMaxJsonlLine before they
// are read whole; false at the end of the file.
bool ReadLine(std::istream& in, std::string* line, size_t max_line, const std::string& where) {
  line->clear();
  char buf[1 << 16];
  bool any = false;
  for (;;) {
    in.getline(buf, sizeof buf);
    const size_t n = static_cast<size_t>(in.gcount());  // the '\n' counts when it was read
    if (!in.fail() && !in.eof()) {                      // ended by '\n'
      line->append(buf, n - 1);
      return true;
    }
    if (in.eof()) {  // the last line, without '\n' (or nothing left)
      line->append(buf, n);
      return any || n > 0;
    }
    line->append(buf, n);  // the buffer filled before a '\n'
    any = true;
    if (line->size() > max_line)
      Fail(where, ": line longer than ", max_line, " bytes (the limit of a JSONL line)");
    in.clear();
  }
}

int64_t IntField(const json& j, const char* key, int64_t def, int64_t lo, int64_t hi,
                 const std::string& where) {
  if (!j.contains(key)) return def;
  const json& v = j[key];
  if (!v.is_number_integer())
    Fail(where, ": field '", key, "' must be an integer (value: ", v.dump().substr(0, 80), ")");
  if (v.is_number_unsigned() ? v.get<uint64_t>() > static_cast<uint64_t>(hi)
                             : (v.get<int64_t>() < lo || v.get<int64_t>() > hi))
    Fail(where, ": field '", key, "' = ", v.dump(), " is outside [", lo, ", ", hi, "]");
  return v.get<int64_t>();
}

std::string StringField(const json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_string())
    Fail(where, ": field '", key, "' is missing or not a string");
  return j[key].get<std::string>();
}
}  // namespace

void ForEachJsonLine(const std::string& path,
                     const std::function<void(const json&, const std::string&)>& f,
                     size_t max_line) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(path, ": cannot open");
  std::string line;
  for (int64_t lineno = 1;; ++lineno) {
    const std::string where = path + ":" + std::to_string(lineno);
    if (!ReadLine(in, &line, max_line, where)) break;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line, [&](int depth, json::parse_event_t, json&) {
        if (depth > kMaxJsonDepth)
          Fail(where, ": nested deeper than ", kMaxJsonDepth, " levels (the limit of a record)");
        return true;
      });
    } catch (const json::exception& e) {
      Fail(where, ": malformed JSON: ", e.what());
    }
    if (!j.is_object()) Fail(where, ": not a JSON object");
    f(j, where);
  }
}

std::vector<std::string> References(const json& j, const std::string& where) {
  for (const char* key : {"answer", "ground_truth", "outputs", "label"}) {
    if (!j.contains(key)) continue;
    const auto& v = j[key];
    if (v.is_string()) return {v.get<std::string>()};
    if (v.is_number_integer()) return {v.dump()};
    if (v.is_array()) {
      std::vector<std::string> out;
      for (const auto& e : v) {
        if (!e.is_string())
          Fail(where, ": field '", key, "' must hold strings (value: ", v.dump().substr(0, 80),
               ")");
        out.push_back(e.get<std::string>());
      }
      return out;
    }
    Fail(where, ": field '", key,
         "' must be a string or a list of strings (value: ", v.dump().substr(0, 80), ")");
  }
  Fail(where, ": no reference field (answer, ground_truth, outputs or label)");
}

std::vector<datasets::Sample> ReadSamples(const std::string& path) {
  std::vector<datasets::Sample> out;
  ForEachJsonLine(path, [&](const json& j, const std::string& where) {
    datasets::Sample s;
    const int64_t max_id = (int64_t{1} << 62);
    s.id = IntField(j, "id", static_cast<int64_t>(out.size()), -max_id, max_id, where);
    if (j.contains("answer_prefix") && j["answer_prefix"].is_string() && j.contains("input") &&
        j["input"].is_string()) {
      // RULER: `input` is the full prompt up to the answer prefix.
      s.prompt = j["input"].get<std::string>() + j["answer_prefix"].get<std::string>();
      s.id = IntField(j, "index", s.id, -max_id, max_id, where);
    } else {
      s.context = StringField(j, "context", where);
      s.input = StringField(j, "input", where);
    }
    s.answer = References(j, where);
    s.depth = -1.0;
    if (j.contains("depth")) {
      const json& d = j["depth"];
      if (!d.is_number() || !std::isfinite(d.get<double>()) || d.get<double>() < 0 ||
          d.get<double>() > 1)
        Fail(where, ": field 'depth' must be a number in [0, 1] (value: ", d.dump().substr(0, 80),
             ")");
      s.depth = d.get<double>();
    }
    s.target_tokens = IntField(j, "length", 0, 0, (int64_t{1} << 31) - 1, where);
    out.push_back(std::move(s));
  });
  return out;
}

std::vector<Prediction> ReadPredictions(const std::string& path) {
  std::vector<Prediction> out;
  ForEachJsonLine(path, [&](const json& j, const std::string& where) {
    Prediction p;
    if (j.contains("prediction") && j["prediction"].is_string())
      p.prediction = j["prediction"].get<std::string>();
    else if (j.contains("pred") && j["pred"].is_string())
      p.prediction = j["pred"].get<std::string>();
    else
      Fail(where, ": no string field 'prediction' (or 'pred')");
    p.references = References(j, where);
    out.push_back(std::move(p));
  });
  return out;
}

namespace {
// A field of the type the runner wrote (json::type_error otherwise, turned into the error that
// names the line): integers within int64, finite numbers.
int64_t IntAt(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX))
    throw json::type_error::create(302, std::string(key) + " is not an integer", &v);
  return v.get<int64_t>();
}
double NumberAt(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    throw json::type_error::create(302, std::string(key) + " is not a finite number", &v);
  return v.get<double>();
}

EvalResult FromJson(const json& j) {
  EvalResult r;
  r.config = j.at("config");
  r.task = j.at("task");
  r.id = IntAt(j, "id");
  r.length = IntAt(j, "length");
  r.depth = NumberAt(j, "depth");
  r.prompt_tokens = IntAt(j, "prompt_tokens");
  r.prediction = j.at("prediction");
  r.answer = j.at("answer").get<std::vector<std::string>>();
  r.score = NumberAt(j, "score");
  r.prefill_tps = j.value("prefill_tok_s", 0.0);
  r.decode_tps = j.value("decode_tok_s", 0.0);
  r.recall = j.value("recall", -1.0);
  r.settings = j.value("settings", "");  // absent in files of needle before it recorded them
  r.sample = j.value("sample", "");
  return r;
}

}  // namespace

json ResultToJson(const EvalResult& r) {
  json j = {{"config", r.config},
            {"task", r.task},
            {"id", r.id},
            {"length", r.length},
            {"depth", r.depth},
            {"prompt_tokens", r.prompt_tokens},
            {"prediction", r.prediction},
            {"answer", r.answer},
            {"score", r.score},
            {"prefill_tok_s", r.prefill_tps},
            {"decode_tok_s", r.decode_tps},
            {"settings", r.settings},
            {"sample", r.sample}};
  if (r.recall >= 0) j["recall"] = r.recall;
  return j;
}

std::vector<EvalResult> ReadResults(const std::string& path) {
  std::vector<EvalResult> out;
  if (!std::filesystem::exists(path)) return out;
  std::string all;
  {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    all = ss.str();
  }
  const size_t keep = all.rfind('\n') == std::string::npos ? 0 : all.rfind('\n') + 1;
  if (keep < all.size()) std::filesystem::resize_file(path, keep);
  std::istringstream in(all.substr(0, keep));
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    try {
      out.push_back(FromJson(ParseJsonBounded(line)));
    } catch (const json::exception&) {
      Fail(path, ":", n, ": malformed result line (delete it to rerun that sample)");
    }
  }
  return out;
}

json ReadJsonFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(path, ": cannot read");
  std::ostringstream ss;
  ss << in.rdbuf();
  try {
    return ParseJsonBounded(ss.str(), kMaxJsonDepth);
  } catch (const json::exception& e) {
    Fail(path, ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace needle::eval
