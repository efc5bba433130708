// The checks every request parser of needle serve runs on a JSON body's fields (server/openai.cc,
// server/ollama.cc): each failure an ApiError 400 that names the field as the client wrote it
// (`at` + key, e.g. "options.temperature") with the value it got.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/base/json_parse.h"
#include "server/openai.h"

namespace needle::server::fields {

[[noreturn]] inline void Bad(const std::string& param, const std::string& message) {
  throw ApiError(400, message, param);
}

// The request body as a JSON object (malformed JSON, numbers beyond a double and nesting deeper
// than 64 levels refused, never walked).
inline nlohmann::json ParseBody(const std::string& body) {
  nlohmann::json j;
  try {
    j = ParseJsonBounded(body, 64);
  } catch (const nlohmann::json::exception& e) {  // (syntax, and numbers beyond a double: 1e400)
    Bad("", std::string("malformed JSON in the request body: ") + e.what());
  }
  if (!j.is_object())
    Bad("", std::string("the request body must be a JSON object, not ") + j.type_name());
  return j;
}

// j[key] present and not null.
inline bool Has(const nlohmann::json& j, const char* key) {
  return j.contains(key) && !j.at(key).is_null();
}

inline double Number(const nlohmann::json& j, const char* key, double lo, double hi,
                     const std::string& at = "") {
  const nlohmann::json& v = j.at(key);
  const std::string name = at + key;
  if (!v.is_number()) Bad(name, "'" + name + "' must be a number, not " + v.type_name());
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi)
    Bad(name, "'" + name + "' is " + v.dump() + ", outside [" + nlohmann::json(lo).dump() + ", " +
                  nlohmann::json(hi).dump() + "]");
  return x;
}

inline int64_t Integer(const nlohmann::json& j, const char* key, int64_t lo, int64_t hi,
                       const std::string& at = "") {
  const nlohmann::json& v = j.at(key);
  const std::string name = at + key;
  if (!v.is_number_integer()) Bad(name, "'" + name + "' must be an integer, not " + v.dump());
  const bool above = v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi);
  const int64_t x = above ? hi : v.get<int64_t>();
  if (above || x < lo || x > hi)
    Bad(name, "'" + name + "' is " + v.dump() + ", outside [" + std::to_string(lo) + ", " +
                  std::to_string(hi) + "]");
  return x;
}

// j[key] as a boolean; absent or null: `dflt`.
inline bool Boolean(const nlohmann::json& j, const char* key, bool dflt = false,
                    const std::string& at = "") {
  if (!Has(j, key)) return dflt;
  if (!j[key].is_boolean()) Bad(at + key, "'" + at + key + "' must be true or false");
  return j[key].get<bool>();
}

// j[key] as a string ("" when absent or null).
inline std::string String(const nlohmann::json& j, const char* key, const std::string& at = "") {
  if (!Has(j, key)) return "";
  if (!j[key].is_string()) Bad(at + key, "'" + at + key + "' must be a string");
  return j[key].get<std::string>();
}

}  // namespace needle::server::fields
