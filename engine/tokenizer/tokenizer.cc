#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <queue>
#include <set>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"
#include "engine/base/mapped_file.h"
#include "engine/tokenizer/pipeline.h"

namespace needle {

using json = nlohmann::json;
using namespace tokenizer_pipeline;

struct Tokenizer::Impl {
  std::vector<AddedToken> added;
  std::vector<std::vector<size_t>> added_by_byte = std::vector<std::vector<size_t>>(256);
  std::set<int32_t> special;
  std::vector<NormStep> norm;
  std::vector<PreStep> pre;
  bool byte_level = false;  // pieces reach BPE already byte-mapped
  std::vector<DecStep> dec;
  std::vector<int32_t> post_prefix, post_suffix;
};

namespace {

void ReplaceAll(std::string* s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t at = 0;
  for (size_t f = s->find(from); f != std::string::npos; f = s->find(from, at)) {
    out.append(*s, at, f - at);
    out += to;
    at = f + from.size();
  }
  out.append(*s, at, std::string::npos);
  *s = std::move(out);
}

// A token id: an integer in [0, kMaxTokenId], checked before it becomes an int32_t (a negative
// id would index below the id table, a huge one allocate it without bound, one above 2^31 wrap).
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;  // config.h's kMaxVocab - 1
int32_t CheckedTokenId(const json& v, const std::string& path, const std::string& field) {
  int64_t id = -1;
  if (v.is_number_unsigned())
    id = v.get<uint64_t>() > static_cast<uint64_t>(kMaxTokenId)
             ? kMaxTokenId + 1
             : static_cast<int64_t>(v.get<uint64_t>());
  else if (v.is_number_integer())
    id = v.get<int64_t>();
  else
    Bad(path, field, "must be an integer token id");
  if (id < 0 || id > kMaxTokenId)
    Bad(path, field,
        "is not a token id in [0, " + std::to_string(kMaxTokenId) + "] (value: " + v.dump() + ")");
  return static_cast<int32_t>(id);
}

bool IsSpaceByte(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

}  // namespace

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::Load(const std::string& path) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->source_ = path;
  json j;
  try {
    j = ParseJsonBounded(ReadTextFile(path));
  } catch (const json::exception& e) {
    Fail(path, ": malformed JSON: ", e.what());
  }
  // Every field is checked where it is read; a type the checks missed still ends here as an
  // error naming the file, never as an exception escaping with the library's bare message.
  try {
    return Parse(std::move(t), j, path);
  } catch (const json::exception& e) {
    Fail(path, ": a field has an unexpected type or value (", e.what(), ")");
  }
}

std::unique_ptr<Tokenizer> Tokenizer::Parse(std::unique_ptr<Tokenizer> t, const json& j,
                                            const std::string& path) {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    Fail(path, ": field 'model' is missing");
  const json& m = j["model"];
  if (m.value("type", "BPE") != "BPE")
    Bad(path, "model.type", "'" + m.value("type", "") + "' is not supported (only BPE)");
  if (!m.contains("vocab") || !m["vocab"].is_object())
    Bad(path, "model.vocab", "is missing or not an object");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && m[k].is_string() && !m[k].get<std::string>().empty())
      Bad(path, std::string("model.") + k, "is not supported");
  if (m.contains("dropout") && !m["dropout"].is_null() &&
      (!m["dropout"].is_number() || m["dropout"].get<double>() > 0))
    Bad(path, "model.dropout", "is not supported");
  int32_t max_id = -1;
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    const int32_t id = CheckedTokenId(it.value(), path, "model.vocab." + it.key());
    t->vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  std::vector<AddedToken> added;
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (size_t i = 0; i < j["added_tokens"].size(); ++i) {
      const json& a = j["added_tokens"][i];
      const std::string field = "added_tokens[" + std::to_string(i) + "]";
      if (!a.is_object() || !a.contains("content") || !a["content"].is_string())
        Bad(path, field + ".content", "is missing or not a string");
      if (!a.contains("id")) Bad(path, field + ".id", "is missing");
      for (const char* k : {"special", "lstrip", "rstrip"})
        if (a.contains(k) && !a[k].is_boolean())
          Bad(path, field + "." + k, "must be true or false");
      AddedToken at{a["content"].get<std::string>(), CheckedTokenId(a["id"], path, field + ".id"),
                    a.value("special", false), a.value("lstrip", false), a.value("rstrip", false)};
      max_id = std::max(max_id, at.id);
      added.push_back(at);
    }
  }
  t->id_to_token_.assign(static_cast<size_t>(max_id + 1), "");
  for (const auto& [s, id] : t->vocab_) t->id_to_token_[id] = s;
  for (const auto& a : added) {
    t->id_to_token_[a.id] = a.content;
    if (a.special) t->impl_->special.insert(a.id);
  }
  // Merges: "a b" strings (older files) or ["a", "b"] pairs (newer ones).
  if (m.contains("merges") && m["merges"].is_array()) {
    int32_t rank = 0;
    for (const auto& mg : m["merges"]) {
      std::string a, b;
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ', 1);
        if (sp == std::string::npos)
          Bad(path, "model.merges[" + std::to_string(rank) + "]", "is not 'a b'");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
        a = mg[0].get<std::string>(), b = mg[1].get<std::string>();
      } else {
        Bad(path, "model.merges[" + std::to_string(rank) + "]", "is neither 'a b' nor [a, b]");
      }
      auto ia = t->vocab_.find(a), ib = t->vocab_.find(b), im = t->vocab_.find(a + b);
      if (ia == t->vocab_.end() || ib == t->vocab_.end() || im == t->vocab_.end())
        Bad(path, "model.merges[" + std::to_string(rank) + "]",
            "names a token missing from the vocabulary: " + a + " " + b);
      const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                           static_cast<uint32_t>(ib->second);
      t->merges_.emplace(key, std::make_pair(rank, im->second));
      ++rank;
    }
  }
  t->byte_fallback_ = m.value("byte_fallback", false);
  t->ignore_merges_ = m.value("ignore_merges", false);
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = t->vocab_.find(m["unk_token"].get<std::string>());
    if (it != t->vocab_.end()) t->unk_ = it->second;
  }
  Impl& impl = *t->impl_;
  impl.added = added;
  for (size_t i = 0; i < impl.added.size(); ++i)
    if (!impl.added[i].content.empty())
      impl.added_by_byte[static_cast<uint8_t>(impl.added[i].content[0])].push_back(i);
  for (auto& v : impl.added_by_byte)
    std::sort(v.begin(), v.end(), [&](size_t x, size_t y) {
      return impl.added[x].content.size() > impl.added[y].content.size();
    });
  ParseNormalizer(j.value("normalizer", json()), path, "normalizer", &impl.norm);
  ParsePre(j.value("pre_tokenizer", json()), path, "pre_tokenizer", &impl.pre, &impl.byte_level);
  ParseDecoder(j.value("decoder", json()), path, "decoder", &impl.dec);
  // Post-processor: only TemplateProcessing adds ids (ByteLevel is offsets only).
  std::function<void(const json&, const std::string&, int)> post = [&](const json& p,
                                                                       const std::string& field,
                                                                       int depth) {
    if (p.is_null()) return;
    const std::string type = StageType(p, path, field);
    if (type == "Sequence") {
      if (depth >= kMaxPipelineDepth)
        Bad(path, field,
            "nests Sequences more than " + std::to_string(kMaxPipelineDepth) + " deep");
      const json& list = RequiredList(p, "processors", path, field);
      for (size_t i = 0; i < list.size(); ++i)
        post(list[i], field + ".processors[" + std::to_string(i) + "]", depth + 1);
    } else if (type == "TemplateProcessing") {
      bool seen_a = false;
      const json& single = RequiredList(p, "single", path, field);
      for (size_t i = 0; i < single.size(); ++i) {
        const json& piece = single[i];
        const std::string pf = field + ".single[" + std::to_string(i) + "]";
        if (!piece.is_object()) Bad(path, pf, "must be an object");
        if (piece.contains("Sequence")) {
          seen_a = true;
        } else if (piece.contains("SpecialToken")) {
          const json& idv = Required(piece["SpecialToken"], "id", path, pf + ".SpecialToken");
          if (!idv.is_string()) Bad(path, pf + ".SpecialToken.id", "must be a string");
          const std::string name = idv.get<std::string>();
          const json& sts = Required(p, "special_tokens", path, field);
          const json& ids =
              RequiredList(Required(sts, name.c_str(), path, field + ".special_tokens"), "ids",
                           path, field + ".special_tokens." + name);
          for (const auto& id : ids)
            (seen_a ? impl.post_suffix : impl.post_prefix)
                .push_back(CheckedTokenId(id, path, field + ".special_tokens." + name + ".ids"));
        }
      }
    } else if (type != "ByteLevel") {
      Bad(path, field + ".type", "'" + type + "' is not a supported post-processor");
    }
  };
  post(j.value("post_processor", json()), "post_processor", 0);
  return t;
}

std::optional<int32_t> Tokenizer::TokenId(const std::string& token) const {
  for (const auto& a : impl_->added)
    if (a.content == token) return a.id;
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string& Tokenizer::TokenText(int32_t id) const {
  static const std::string empty;
  return id >= 0 && id < static_cast<int32_t>(id_to_token_.size()) ? id_to_token_[id] : empty;
}

bool Tokenizer::IsSpecial(int32_t id) const { return impl_->special.count(id) > 0; }

// BPE of one piece: symbols are its code points (or bytes via <0xXX> fallback); the lowest-rank
// adjacent pair merges first, leftmost on ties, like tokenizers' BPE::merge_word.
void Tokenizer::Bpe(const std::string& word, std::vector<int32_t>* out) const {
  if (ignore_merges_) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  struct Sym {
    int32_t id;
    int prev, next;
  };
  std::vector<Sym> syms;
  for (size_t i = 0; i < word.size();) {
    const size_t n = std::min(word.size() - i,
                              static_cast<size_t>(text::Utf8Len(static_cast<uint8_t>(word[i]))));
    auto it = vocab_.find(word.substr(i, n));
    if (it != vocab_.end()) {
      syms.push_back(
          {it->second, static_cast<int>(syms.size()) - 1, static_cast<int>(syms.size()) + 1});
    } else if (byte_fallback_) {
      for (size_t k = 0; k < n; ++k) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "<0x%02X>", static_cast<unsigned char>(word[i + k]));
        auto bt = vocab_.find(buf);
        if (bt != vocab_.end())
          syms.push_back(
              {bt->second, static_cast<int>(syms.size()) - 1, static_cast<int>(syms.size()) + 1});
        else if (unk_)
          syms.push_back(
              {*unk_, static_cast<int>(syms.size()) - 1, static_cast<int>(syms.size()) + 1});
      }
    } else if (unk_) {
      syms.push_back({*unk_, static_cast<int>(syms.size()) - 1, static_cast<int>(syms.size()) + 1});
    }
    i += n;
  }
  if (!syms.empty()) syms.back().next = -1;
  struct Cand {
    int32_t rank;
    int pos;
    int32_t left, right;
    bool operator>(const Cand& o) const { return rank > o.rank || (rank == o.rank && pos > o.pos); }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int pos) {
    if (pos < 0 || syms[pos].next < 0) return;
    const int nx = syms[pos].next;
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(syms[pos].id)) << 32) |
                         static_cast<uint32_t>(syms[nx].id);
    auto it = merges_.find(key);
    if (it != merges_.end()) heap.push({it->second.first, pos, syms[pos].id, syms[nx].id});
  };
  for (int i = 0; i + 1 < static_cast<int>(syms.size()); ++i) push(i);
  std::vector<bool> dead(syms.size(), false);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    if (dead[c.pos] || syms[c.pos].id != c.left || syms[c.pos].next < 0) continue;
    const int nx = syms[c.pos].next;
    if (syms[nx].id != c.right) continue;
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(c.left)) << 32) |
                         static_cast<uint32_t>(c.right);
    syms[c.pos].id = merges_.at(key).second;
    dead[nx] = true;
    syms[c.pos].next = syms[nx].next;
    if (syms[nx].next >= 0) syms[syms[nx].next].prev = c.pos;
    push(syms[c.pos].prev);
    push(c.pos);
  }
  std::vector<int32_t> ids;
  for (size_t i = 0; i < syms.size(); ++i)
    if (!dead[i]) ids.push_back(syms[i].id);
  out->insert(out->end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (cache_.size() > 200000) cache_.clear();
  cache_.emplace(word, std::move(ids));
}

void Tokenizer::EncodeSegment(std::string_view seg, bool first_segment,
                              std::vector<int32_t>* out) const {
  std::string s(seg);
  for (const auto& n : impl_->norm) {
    switch (n.kind) {
      case NormStep::kNormalForm:
        s = text::Normalize(s, n.form);
        break;
      case NormStep::kLowercase:
        for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        break;
      case NormStep::kReplace:
        ReplaceAll(&s, n.from, n.to);
        break;
      case NormStep::kPrepend:
        if (!s.empty()) s = n.to + s;
        break;
    }
  }
  std::vector<std::string> pieces{s};
  for (const auto& p : impl_->pre) {
    std::vector<std::string> next;
    for (size_t pi = 0; pi < pieces.size(); ++pi) {
      std::string& piece = pieces[pi];
      switch (p.kind) {
        case PreStep::kSplit:
        case PreStep::kDigits: {
          size_t at = 0;
          for (auto [b, e] : p.regex->FindAll(piece)) {
            if (b > at && !p.removed) next.push_back(piece.substr(at, b - at));
            next.push_back(piece.substr(b, e - b));
            at = e;
          }
          if (at < piece.size() && !p.removed) next.push_back(piece.substr(at));
          break;
        }
        case PreStep::kByteLevel: {
          if (p.add_prefix_space && (piece.empty() || piece[0] != ' ')) piece = " " + piece;
          std::vector<std::string> parts;
          if (p.regex) {
            for (auto [b, e] : p.regex->FindAll(piece)) parts.push_back(piece.substr(b, e - b));
          } else {
            parts.push_back(piece);
          }
          for (const auto& part : parts) {
            std::string mapped;
            for (unsigned char c : part) mapped += text::ByteToUnicode(c);
            next.push_back(std::move(mapped));
          }
          break;
        }
        case PreStep::kMetaspace: {
          std::string r = piece;
          ReplaceAll(&r, " ", p.replacement);
          const bool prepend =
              p.prepend == "always" || (p.prepend == "first" && first_segment && pi == 0);
          if (prepend && r.compare(0, p.replacement.size(), p.replacement) != 0)
            r = p.replacement + r;
          next.push_back(std::move(r));
          break;
        }
      }
    }
    pieces = std::move(next);
  }
  for (const auto& piece : pieces)
    if (!piece.empty()) Bpe(piece, out);
}

std::vector<int32_t> Tokenizer::Encode(std::string_view input, bool add_special_tokens) const {
  const std::string s = text::SanitizeUtf8(input);
  std::vector<int32_t> out;
  if (add_special_tokens) out = impl_->post_prefix;
  // Split on added tokens (longest match at each position), absorbing whitespace for lstrip/rstrip.
  size_t seg_begin = 0, i = 0;
  bool first = true;
  while (i < s.size()) {
    const AddedToken* hit = nullptr;
    for (size_t idx : impl_->added_by_byte[static_cast<uint8_t>(s[i])]) {
      const auto& a = impl_->added[idx];
      if (s.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    size_t seg_end = i;
    if (hit->lstrip)
      while (seg_end > seg_begin && IsSpaceByte(s[seg_end - 1])) --seg_end;
    if (seg_end > seg_begin)
      EncodeSegment(std::string_view(s).substr(seg_begin, seg_end - seg_begin), first, &out);
    first = false;
    out.push_back(hit->id);
    i += hit->content.size();
    if (hit->rstrip)
      while (i < s.size() && IsSpaceByte(s[i])) ++i;
    seg_begin = i;
  }
  if (seg_begin < s.size()) EncodeSegment(std::string_view(s).substr(seg_begin), first, &out);
  if (add_special_tokens)
    out.insert(out.end(), impl_->post_suffix.begin(), impl_->post_suffix.end());
  return out;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  // Runs of ordinary tokens go through the decoder chain; added tokens are emitted as their text.
  std::string result;
  std::vector<std::string> run;
  auto flush = [&] {
    if (run.empty()) return;
    std::vector<std::string> toks = std::move(run);
    run.clear();
    for (const auto& d : impl_->dec) {
      switch (d.kind) {
        case DecStep::kByteLevel:
          for (auto& t : toks) {
            std::string bytes;
            for (size_t k = 0; k < t.size();) {
              int len = 1;
              const int b = text::UnicodeToByte(std::string_view(t).substr(k), &len);
              if (b >= 0)
                bytes.push_back(static_cast<char>(b));
              else
                bytes.append(t, k, static_cast<size_t>(len));
              k += static_cast<size_t>(len);
            }
            t = std::move(bytes);
          }
          break;
        case DecStep::kMetaspace:
          for (size_t k = 0; k < toks.size(); ++k) {
            ReplaceAll(&toks[k], d.from, " ");
            if (d.add_prefix_space && k == 0 && result.empty() && !toks[k].empty() &&
                toks[k][0] == ' ')
              toks[k].erase(0, 1);
          }
          break;
        case DecStep::kReplace:
          for (auto& t : toks) ReplaceAll(&t, d.from, d.to);
          break;
        case DecStep::kByteFallback:
          for (auto& t : toks) {
            unsigned v;
            if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
                std::sscanf(t.c_str() + 3, "%2X", &v) == 1)
              t = std::string(1, static_cast<char>(v));
          }
          break;
        case DecStep::kFuse: {
          std::string all;
          for (auto& t : toks) all += t;
          toks.assign(1, all);
          break;
        }
        case DecStep::kStrip:
          for (auto& t : toks) {
            int a = 0;
            while (a < d.start && t.compare(static_cast<size_t>(a) * d.content.size(),
                                            d.content.size(), d.content) == 0)
              ++a;
            t.erase(0, static_cast<size_t>(a) * d.content.size());
            int z = 0;
            while (z < d.stop && t.size() >= d.content.size() &&
                   t.compare(t.size() - d.content.size(), d.content.size(), d.content) == 0) {
              t.erase(t.size() - d.content.size());
              ++z;
            }
          }
          break;
      }
    }
    for (auto& t : toks) result += t;
  };
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int32_t>(id_to_token_.size())) continue;
    const bool is_added = std::any_of(impl_->added.begin(), impl_->added.end(),
                                      [&](const AddedToken& a) { return a.id == id; });
    if (is_added) {
      flush();
      if (!(skip_special_tokens && IsSpecial(id))) result += id_to_token_[id];
    } else {
      run.push_back(id_to_token_[id]);
    }
  }
  flush();
  return result;
}

std::string StreamDecoder::Push(int32_t id) {
  ids_.push_back(id);
  const std::vector<int32_t> prefix(ids_.begin() + static_cast<long>(prefix_),
                                    ids_.begin() + static_cast<long>(read_));
  const std::vector<int32_t> all(ids_.begin() + static_cast<long>(prefix_), ids_.end());
  const std::string a = t_.Decode(prefix, skip_), b = t_.Decode(all, skip_);
  if (b.size() > a.size() && b.compare(0, a.size(), a) == 0 && text::IncompleteUtf8Tail(b) == 0) {
    prefix_ = read_;
    read_ = ids_.size();
    // Invalid byte sequences (a model can emit any byte token) print as U+FFFD.
    return text::SanitizeUtf8(b.substr(a.size()));
  }
  return "";
}

std::string StreamDecoder::Flush() {
  const std::vector<int32_t> prefix(ids_.begin() + static_cast<long>(prefix_),
                                    ids_.begin() + static_cast<long>(read_));
  const std::vector<int32_t> all(ids_.begin() + static_cast<long>(prefix_), ids_.end());
  const std::string a = t_.Decode(prefix, skip_), b = t_.Decode(all, skip_);
  prefix_ = read_ = ids_.size();
  return b.size() > a.size() ? text::SanitizeUtf8(b.substr(a.size())) : "";
}

}  // namespace needle
