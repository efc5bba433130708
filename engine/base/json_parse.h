// Parsing the JSON files needle reads (config.json, tokenizer.json, safetensors headers, ...)
// with a bound on nesting. nlohmann's parser itself is iterative, but copying, comparing and
// printing a value recurse: a file nested tens of thousands deep (the tokenizer test's hostile
// pipeline) overflowed the stack in the code that walked it. None of the formats nests more than
// a few levels.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace needle {

constexpr int kMaxJsonNesting = 256;

// The parser callback that refuses input nested deeper than max_depth: json::out_of_range (a
// json::exception, which every reader already turns into its error naming the file).
inline nlohmann::json::parser_callback_t DepthBound(int max_depth) {
  return [max_depth](int depth, nlohmann::json::parse_event_t, nlohmann::json& v) {
    if (depth > max_depth)
      throw nlohmann::json::out_of_range::create(
          410, "nested more than " + std::to_string(max_depth) + " levels", &v);
    return true;
  };
}

// json::parse with a nesting bound.
template <typename Input>
nlohmann::json ParseJsonBounded(Input&& in, int max_depth = kMaxJsonNesting) {
  return nlohmann::json::parse(std::forward<Input>(in), DepthBound(max_depth));
}
template <typename It>
nlohmann::json ParseJsonBounded(It first, It last, int max_depth = kMaxJsonNesting) {
  return nlohmann::json::parse(first, last, DepthBound(max_depth));
}

}  // namespace needle
