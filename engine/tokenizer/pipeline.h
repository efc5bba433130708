// The stages of a tokenizer.json pipeline (added tokens, normalizers, pre-tokenizers, decoders)
// as plain structs, and the parsing of each section; tokenizer.cc runs them.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/tokenizer/text.h"

namespace needle::tokenizer_pipeline {

using json = nlohmann::json;

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip;
};

struct NormStep {
  enum Kind { kNormalForm, kLowercase, kReplace, kPrepend } kind;
  text::NormalForm form = text::NormalForm::kNFC;
  std::string from{}, to{};  // Replace (literal), Prepend (to)
};

struct PreStep {
  enum Kind { kSplit, kByteLevel, kMetaspace, kDigits } kind;
  std::shared_ptr<text::Regex> regex{};
  bool removed = false;            // Split behavior Removed (else Isolated)
  bool add_prefix_space = false;   // ByteLevel, Metaspace
  std::string replacement{};       // Metaspace
  std::string prepend = "always";  // Metaspace prepend_scheme
  bool individual_digits = false;
};

struct DecStep {
  enum Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip } kind;
  std::string from{}, to{};  // Replace; Metaspace replacement in `from`
  bool add_prefix_space = false;
  std::string content{};  // Strip
  int start = 0, stop = 0;
};

// Each parser appends the stages of one tokenizer.json section; errors name the file and field.
// Every key a stage needs is checked before it is read (a missing one is an error, not a read
// out of bounds); Sequences nest at most kMaxPipelineDepth deep (depth: the caller's nesting).
constexpr int kMaxPipelineDepth = 16;
// Strip decoders strip at most this many copies of their content from each end.
constexpr int kMaxStrip = 1024;
void ParseNormalizer(const json& n, const std::string& src, const std::string& field,
                     std::vector<NormStep>* out, int depth = 0);
// *byte_level is set when a ByteLevel stage maps pieces to bytes before BPE.
void ParsePre(const json& p, const std::string& src, const std::string& field,
              std::vector<PreStep>* out, bool* byte_level, int depth = 0);
void ParseDecoder(const json& d, const std::string& src, const std::string& field,
                  std::vector<DecStep>* out, int depth = 0);
// p[key], or an error naming field.key when p is not an object holding it; List: an array.
const json& Required(const json& p, const char* key, const std::string& src,
                     const std::string& field);
const json& RequiredList(const json& p, const char* key, const std::string& src,
                         const std::string& field);
// The stage's "type" (a string), checking that the stage is an object.
std::string StageType(const json& p, const std::string& src, const std::string& field);
// An optional string / bool member with its default, type-checked.
std::string OptString(const json& p, const char* key, const std::string& dflt,
                      const std::string& src, const std::string& field);
bool OptBool(const json& p, const char* key, bool dflt, const std::string& src,
             const std::string& field);
// The literal of {"String": ...} patterns (used by Replace stages).
std::string LiteralOf(const json& p, const std::string& src, const std::string& field);
[[noreturn]] void Bad(const std::string& src, const std::string& field, const std::string& why);

}  // namespace needle::tokenizer_pipeline
