#include "engine/tokenizer/pipeline.h"

#include "engine/base/error.h"

namespace needle::tokenizer_pipeline {

const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

[[noreturn]] void Bad(const std::string& src, const std::string& field, const std::string& why) {
  Fail(src, ": field '", field, "' ", why);
}

std::string PatternOf(const json& p, const std::string& src, const std::string& field) {
  if (p.is_object() && p.contains("Regex") && p["Regex"].is_string())
    return p["Regex"].get<std::string>();
  Bad(src, field, "must be {\"Regex\": ...}");
}

std::string LiteralOf(const json& p, const std::string& src, const std::string& field) {
  if (p.is_object() && p.contains("String") && p["String"].is_string())
    return p["String"].get<std::string>();
  Bad(src, field, "must be {\"String\": ...} (regex replacements are not supported)");
}

const json& Required(const json& p, const char* key, const std::string& src,
                     const std::string& field) {
  if (!p.is_object() || !p.contains(key)) Bad(src, field + "." + key, "is missing");
  return p[key];
}

const json& RequiredList(const json& p, const char* key, const std::string& src,
                         const std::string& field) {
  const json& v = Required(p, key, src, field);
  if (!v.is_array()) Bad(src, field + "." + key, "must be a list");
  return v;
}

std::string StageType(const json& p, const std::string& src, const std::string& field) {
  if (!p.is_object()) Bad(src, field, "must be an object");
  return OptString(p, "type", "", src, field);
}

std::string OptString(const json& p, const char* key, const std::string& dflt,
                      const std::string& src, const std::string& field) {
  if (!p.contains(key) || p[key].is_null()) return dflt;
  if (!p[key].is_string()) Bad(src, field + "." + key, "must be a string");
  return p[key].get<std::string>();
}

bool OptBool(const json& p, const char* key, bool dflt, const std::string& src,
             const std::string& field) {
  if (!p.contains(key) || p[key].is_null()) return dflt;
  if (!p[key].is_boolean()) Bad(src, field + "." + key, "must be true or false");
  return p[key].get<bool>();
}

namespace {
// The depth check of a Sequence stage about to recurse.
void CheckDepth(int depth, const std::string& src, const std::string& field) {
  if (depth >= kMaxPipelineDepth)
    Bad(src, field, "nests Sequences more than " + std::to_string(kMaxPipelineDepth) + " deep");
}
// A Strip count: an integer in [0, kMaxStrip].
int StripCount(const json& d, const char* key, const std::string& src, const std::string& field) {
  if (!d.contains(key) || d[key].is_null()) return 0;
  const json& v = d[key];
  if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > kMaxStrip)
    Bad(src, field + "." + key, "must be an integer in [0, " + std::to_string(kMaxStrip) + "]");
  return static_cast<int>(v.get<int64_t>());
}
}  // namespace

void ParseNormalizer(const json& n, const std::string& src, const std::string& field,
                     std::vector<NormStep>* out, int depth) {
  if (n.is_null()) return;
  const std::string t = StageType(n, src, field);
  if (t == "Sequence") {
    CheckDepth(depth, src, field);
    const json& list = RequiredList(n, "normalizers", src, field);
    for (size_t i = 0; i < list.size(); ++i)
      ParseNormalizer(list[i], src, field + ".normalizers[" + std::to_string(i) + "]", out,
                      depth + 1);
  } else if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD") {
    NormStep s{NormStep::kNormalForm};
    s.form = t == "NFC"    ? text::NormalForm::kNFC
             : t == "NFD"  ? text::NormalForm::kNFD
             : t == "NFKC" ? text::NormalForm::kNFKC
                           : text::NormalForm::kNFKD;
    out->push_back(s);
  } else if (t == "Lowercase") {
    out->push_back(NormStep{NormStep::kLowercase});
  } else if (t == "Replace") {
    NormStep s{NormStep::kReplace};
    s.from = LiteralOf(Required(n, "pattern", src, field), src, field + ".pattern");
    s.to = OptString(n, "content", "", src, field);
    out->push_back(s);
  } else if (t == "Prepend") {
    NormStep s{NormStep::kPrepend};
    s.to = OptString(n, "prepend", "", src, field);
    out->push_back(s);
  } else {
    Bad(src, field + ".type", "'" + t + "' is not a supported normalizer");
  }
}

void ParsePre(const json& p, const std::string& src, const std::string& field,
              std::vector<PreStep>* out, bool* byte_level, int depth) {
  if (p.is_null()) return;
  const std::string t = StageType(p, src, field);
  if (t == "Sequence") {
    CheckDepth(depth, src, field);
    const json& list = RequiredList(p, "pretokenizers", src, field);
    for (size_t i = 0; i < list.size(); ++i)
      ParsePre(list[i], src, field + ".pretokenizers[" + std::to_string(i) + "]", out, byte_level,
               depth + 1);
  } else if (t == "Split") {
    PreStep s{PreStep::kSplit};
    s.regex = std::make_shared<text::Regex>(
        PatternOf(Required(p, "pattern", src, field), src, field + ".pattern"));
    const std::string b = OptString(p, "behavior", "Isolated", src, field);
    if (b != "Isolated" && b != "Removed")
      Bad(src, field + ".behavior", "'" + b + "' is not supported (Isolated, Removed)");
    if (OptBool(p, "invert", false, src, field))
      Bad(src, field + ".invert", "true is not supported");
    s.removed = b == "Removed";
    out->push_back(s);
  } else if (t == "ByteLevel") {
    PreStep s{PreStep::kByteLevel};
    s.add_prefix_space = OptBool(p, "add_prefix_space", false, src, field);
    if (OptBool(p, "use_regex", true, src, field))
      s.regex = std::make_shared<text::Regex>(kGpt2Pattern);
    out->push_back(s);
    *byte_level = true;
  } else if (t == "Metaspace") {
    PreStep s{PreStep::kMetaspace};
    s.replacement = OptString(p, "replacement", "\xE2\x96\x81", src, field);
    s.prepend = OptString(p, "prepend_scheme",
                          OptBool(p, "add_prefix_space", true, src, field) ? "always" : "never",
                          src, field);
    if (OptBool(p, "split", false, src, field)) Bad(src, field + ".split", "true is not supported");
    out->push_back(s);
  } else if (t == "Digits") {
    PreStep s{PreStep::kDigits};
    s.individual_digits = OptBool(p, "individual_digits", false, src, field);
    s.regex =
        std::make_shared<text::Regex>(s.individual_digits ? "[0-9]|[^0-9]+" : "[0-9]+|[^0-9]+");
    out->push_back(s);
  } else {
    Bad(src, field + ".type", "'" + t + "' is not a supported pre-tokenizer");
  }
}

void ParseDecoder(const json& d, const std::string& src, const std::string& field,
                  std::vector<DecStep>* out, int depth) {
  if (d.is_null()) return;
  const std::string t = StageType(d, src, field);
  if (t == "Sequence") {
    CheckDepth(depth, src, field);
    const json& list = RequiredList(d, "decoders", src, field);
    for (size_t i = 0; i < list.size(); ++i)
      ParseDecoder(list[i], src, field + ".decoders[" + std::to_string(i) + "]", out, depth + 1);
  } else if (t == "ByteLevel") {
    out->push_back(DecStep{DecStep::kByteLevel});
  } else if (t == "Metaspace") {
    DecStep s{DecStep::kMetaspace};
    s.from = OptString(d, "replacement", "\xE2\x96\x81", src, field);
    s.add_prefix_space =
        OptString(d, "prepend_scheme",
                  OptBool(d, "add_prefix_space", true, src, field) ? "always" : "never", src,
                  field) != "never";
    out->push_back(s);
  } else if (t == "Replace") {
    DecStep s{DecStep::kReplace};
    s.from = LiteralOf(Required(d, "pattern", src, field), src, field + ".pattern");
    s.to = OptString(d, "content", "", src, field);
    out->push_back(s);
  } else if (t == "ByteFallback") {
    out->push_back(DecStep{DecStep::kByteFallback});
  } else if (t == "Fuse") {
    out->push_back(DecStep{DecStep::kFuse});
  } else if (t == "Strip") {
    DecStep s{DecStep::kStrip};
    s.content = OptString(d, "content", " ", src, field);
    if (s.content.empty()) Bad(src, field + ".content", "must not be empty");
    s.start = StripCount(d, "start", src, field);
    s.stop = StripCount(d, "stop", src, field);
    out->push_back(s);
  } else {
    Bad(src, field + ".type", "'" + t + "' is not a supported decoder");
  }
}

}  // namespace needle::tokenizer_pipeline
