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

void ParseNormalizer(const json& n, const std::string& src, const std::string& field,
                     std::vector<NormStep>* out) {
  if (n.is_null()) return;
  const std::string t = n.value("type", "");
  if (t == "Sequence") {
    for (size_t i = 0; i < n["normalizers"].size(); ++i)
      ParseNormalizer(n["normalizers"][i], src, field + ".normalizers[" + std::to_string(i) + "]",
                      out);
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
    s.from = LiteralOf(n["pattern"], src, field + ".pattern");
    s.to = n.value("content", "");
    out->push_back(s);
  } else if (t == "Prepend") {
    NormStep s{NormStep::kPrepend};
    s.to = n.value("prepend", "");
    out->push_back(s);
  } else {
    Bad(src, field + ".type", "'" + t + "' is not a supported normalizer");
  }
}

void ParsePre(const json& p, const std::string& src, const std::string& field,
              std::vector<PreStep>* out, bool* byte_level) {
  if (p.is_null()) return;
  const std::string t = p.value("type", "");
  if (t == "Sequence") {
    for (size_t i = 0; i < p["pretokenizers"].size(); ++i)
      ParsePre(p["pretokenizers"][i], src, field + ".pretokenizers[" + std::to_string(i) + "]", out,
               byte_level);
  } else if (t == "Split") {
    PreStep s{PreStep::kSplit};
    s.regex = std::make_shared<text::Regex>(PatternOf(p["pattern"], src, field + ".pattern"));
    const std::string b = p.value("behavior", "Isolated");
    if (b != "Isolated" && b != "Removed")
      Bad(src, field + ".behavior", "'" + b + "' is not supported (Isolated, Removed)");
    if (p.value("invert", false)) Bad(src, field + ".invert", "true is not supported");
    s.removed = b == "Removed";
    out->push_back(s);
  } else if (t == "ByteLevel") {
    PreStep s{PreStep::kByteLevel};
    s.add_prefix_space = p.value("add_prefix_space", false);
    if (p.value("use_regex", true)) s.regex = std::make_shared<text::Regex>(kGpt2Pattern);
    out->push_back(s);
    *byte_level = true;
  } else if (t == "Metaspace") {
    PreStep s{PreStep::kMetaspace};
    s.replacement = p.value("replacement", "\xE2\x96\x81");
    s.prepend = p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    if (p.value("split", false)) Bad(src, field + ".split", "true is not supported");
    out->push_back(s);
  } else if (t == "Digits") {
    PreStep s{PreStep::kDigits};
    s.individual_digits = p.value("individual_digits", false);
    s.regex =
        std::make_shared<text::Regex>(s.individual_digits ? "[0-9]|[^0-9]+" : "[0-9]+|[^0-9]+");
    out->push_back(s);
  } else {
    Bad(src, field + ".type", "'" + t + "' is not a supported pre-tokenizer");
  }
}

void ParseDecoder(const json& d, const std::string& src, const std::string& field,
                  std::vector<DecStep>* out) {
  if (d.is_null()) return;
  const std::string t = d.value("type", "");
  if (t == "Sequence") {
    for (size_t i = 0; i < d["decoders"].size(); ++i)
      ParseDecoder(d["decoders"][i], src, field + ".decoders[" + std::to_string(i) + "]", out);
  } else if (t == "ByteLevel") {
    out->push_back(DecStep{DecStep::kByteLevel});
  } else if (t == "Metaspace") {
    DecStep s{DecStep::kMetaspace};
    s.from = d.value("replacement", "\xE2\x96\x81");
    s.add_prefix_space = d.value("prepend_scheme",
                                 d.value("add_prefix_space", true) ? "always" : "never") != "never";
    out->push_back(s);
  } else if (t == "Replace") {
    DecStep s{DecStep::kReplace};
    s.from = LiteralOf(d["pattern"], src, field + ".pattern");
    s.to = d.value("content", "");
    out->push_back(s);
  } else if (t == "ByteFallback") {
    out->push_back(DecStep{DecStep::kByteFallback});
  } else if (t == "Fuse") {
    out->push_back(DecStep{DecStep::kFuse});
  } else if (t == "Strip") {
    DecStep s{DecStep::kStrip};
    s.content = d.value("content", " ");
    s.start = d.value("start", 0);
    s.stop = d.value("stop", 0);
    out->push_back(s);
  } else {
    Bad(src, field + ".type", "'" + t + "' is not a supported decoder");
  }
}

}  // namespace needle::tokenizer_pipeline
