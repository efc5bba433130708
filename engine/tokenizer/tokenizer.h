// Hugging Face tokenizer.json, BPE models: byte-level BPE (GPT-2, Llama-3, Qwen2/2.5/3) and the
// SentencePiece-style BPE of Llama-2/Mistral (Metaspace or prepend-and-replace, byte fallback).
//
// Encode: invalid UTF-8 -> U+FFFD; added/special tokens matched first (longest, honouring
// lstrip/rstrip); each remaining segment normalised, pre-tokenised (Split with a PCRE2 Unicode
// regex, ByteLevel, Metaspace, Digits), and each piece merged by BPE rank (with a word cache);
// the post-processor adds BOS/EOS templates when asked.
// Decode: the decoder chain (ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip), added
// tokens passed through as their text. StreamDecoder emits text only at UTF-8 boundaries.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "engine/tokenizer/text.h"

namespace needle {

class Tokenizer {
 public:
  // Throws Error naming the file and the field for anything malformed or unsupported.
  static std::unique_ptr<Tokenizer> Load(const std::string& tokenizer_json_path);
  ~Tokenizer();

  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens = false) const;
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }
  std::optional<int32_t> TokenId(const std::string& token) const;
  const std::string& TokenText(int32_t id) const;  // the vocabulary entry (raw, e.g. "Ġthe")
  bool IsSpecial(int32_t id) const;

  struct Impl;  // pipeline stages, defined in tokenizer.cc

 private:
  // Load's body, on the parsed file.
  static std::unique_ptr<Tokenizer> Parse(std::unique_ptr<Tokenizer> t, const nlohmann::json& j,
                                          const std::string& path);
  Tokenizer();
  void EncodeSegment(std::string_view text, bool first_segment, std::vector<int32_t>* out) const;
  void Bpe(const std::string& word, std::vector<int32_t>* out) const;

  std::string source_;
  std::unique_ptr<Impl> impl_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a, b) -> (rank, merged id)
  bool byte_fallback_ = false, ignore_merges_ = false;
  std::optional<int32_t> unk_;
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

// Incremental detokenisation for streaming output: Push returns the new text that is complete
// (never half of a multi-byte character, never a space that later pieces would change).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& t, bool skip_special_tokens = true)
      : t_(t), skip_(skip_special_tokens) {}
  std::string Push(int32_t id);
  std::string Flush();  // whatever is left (invalid tails become U+FFFD)

 private:
  const Tokenizer& t_;
  bool skip_;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0, read_ = 0;
};

}  // namespace needle
