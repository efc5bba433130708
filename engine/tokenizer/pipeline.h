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
  std::string from, to;  // Replace (literal), Prepend (to)
};

struct PreStep {
  enum Kind { kSplit, kByteLevel, kMetaspace, kDigits } kind;
  std::shared_ptr<text::Regex> regex;
  bool removed = false;            // Split behavior Removed (else Isolated)
  bool add_prefix_space = false;   // ByteLevel, Metaspace
  std::string replacement;         // Metaspace
  std::string prepend = "always";  // Metaspace prepend_scheme
  bool individual_digits = false;
};

struct DecStep {
  enum Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip } kind;
  std::string from, to;  // Replace; Metaspace replacement in `from`
  bool add_prefix_space = false;
  std::string content;  // Strip
  int start = 0, stop = 0;
};

// Each parser appends the stages of one tokenizer.json section; errors name the file and field.
void ParseNormalizer(const json& n, const std::string& src, const std::string& field,
                     std::vector<NormStep>* out);
// *byte_level is set when a ByteLevel stage maps pieces to bytes before BPE.
void ParsePre(const json& p, const std::string& src, const std::string& field,
              std::vector<PreStep>* out, bool* byte_level);
void ParseDecoder(const json& d, const std::string& src, const std::string& field,
                  std::vector<DecStep>* out);
// The literal of {"String": ...} patterns (used by Replace stages).
std::string LiteralOf(const json& p, const std::string& src, const std::string& field);
[[noreturn]] void Bad(const std::string& src, const std::string& field, const std::string& why);

}  // namespace needle::tokenizer_pipeline
