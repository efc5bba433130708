#include "engine/model/config.h"

#include <sys/stat.h>

#include <climits>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"
#include "engine/base/mapped_file.h"

namespace needle {

using json = nlohmann::json;

const char* ArchName(Arch a) {
  switch (a) {
    case Arch::kLlama:
      return "llama";
    case Arch::kMistral:
      return "mistral";
    case Arch::kQwen2:
      return "qwen2";
    case Arch::kQwen3:
      return "qwen3";
  }
  return "?";
}

const char* RopeTypeName(RopeType t) {
  switch (t) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kDynamic:
      return "dynamic";
    case RopeType::kYarn:
      return "yarn";
    case RopeType::kLlama3:
      return "llama3";
  }
  return "?";
}

namespace {

// A JSON value for an error message, without recursion (a value nested 100,000 deep must not
// overflow the stack while a message is being written): scalars as written, arrays and objects
// one level deep with nested ones as [...] / {...}; cut at 80 characters.
std::string ShortValue(const json& v) {
  auto scalar = [](const json& e) -> std::string {
    if (e.is_array()) return "[...]";
    if (e.is_object()) return "{...}";
    return e.dump();
  };
  std::string s;
  if (v.is_array() || v.is_object()) {
    s = v.is_array() ? "[" : "{";
    bool first = true;
    for (auto it = v.begin(); it != v.end() && s.size() <= 80; ++it, first = false) {
      if (!first) s += ",";
      if (v.is_object()) s += json(it.key()).dump() + ":";
      s += scalar(it.value());
    }
    s += v.is_array() ? "]" : "}";
  } else {
    s = v.dump();
  }
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

// Field readers that name the file and the field (with its parent object) in every error.
class Fields {
 public:
  Fields(const json& j, std::string source, std::string prefix = "")
      : j_(j), source_(std::move(source)), prefix_(std::move(prefix)) {}

  bool Has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  std::string Name(const char* key) const { return prefix_ + key; }

  [[noreturn]] void Bad(const char* key, const std::string& why) const {
    const std::string value = j_.contains(key) ? ShortValue(j_.at(key)) : "(missing)";
    Fail(source_, ": field '", Name(key), "' ", why, " (value: ", value, ")");
  }

  // An integer field. Floats count when they are whole and within int64 (converted only after
  // that check: a float out of range has no int64 value); unsigned values above int64 do not.
  int64_t Int(const char* key) const {
    if (!Has(key)) Fail(source_, ": required field '", Name(key), "' is missing");
    const json& v = j_.at(key);
    if (v.is_number_unsigned()) {
      if (v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) Bad(key, "is out of range");
      return static_cast<int64_t>(v.get<uint64_t>());
    }
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 0x1p63)
        return static_cast<int64_t>(d);
    }
    Bad(key, "must be an integer");
  }
  int64_t Int(const char* key, int64_t dflt) const { return Has(key) ? Int(key) : dflt; }
  // A positive integer of at most `max` (the documented bound of the field, checked before
  // anything is sized from it).
  int64_t PositiveInt(const char* key, int64_t max = INT64_MAX) const {
    int64_t v = Int(key);
    if (v <= 0) Bad(key, "must be a positive integer");
    if (v > max) Bad(key, Concat("is above needle's limit of ", max));
    return v;
  }
  double Num(const char* key) const {
    if (!Has(key)) Fail(source_, ": required field '", Name(key), "' is missing");
    const json& v = j_.at(key);
    if (!v.is_number()) Bad(key, "must be a number");
    return v.get<double>();
  }
  double Num(const char* key, double dflt) const { return Has(key) ? Num(key) : dflt; }
  bool Bool(const char* key, bool dflt) const {
    if (!Has(key)) return dflt;
    const json& v = j_.at(key);
    if (!v.is_boolean()) Bad(key, "must be true or false");
    return v.get<bool>();
  }
  std::string Str(const char* key, const std::string& dflt) const {
    if (!Has(key)) return dflt;
    const json& v = j_.at(key);
    if (!v.is_string()) Bad(key, "must be a string");
    return v.get<std::string>();
  }
  // An int or a list of ints (bos/eos ids are written both ways).
  std::vector<int64_t> IntList(const char* key) const {
    std::vector<int64_t> out;
    if (!Has(key)) return out;
    const json& v = j_.at(key);
    if (v.is_number_integer()) {
      out.push_back(v.get<int64_t>());
    } else if (v.is_array()) {
      for (const auto& e : v) {
        if (!e.is_number_integer()) Bad(key, "must be an integer or a list of integers");
        out.push_back(e.get<int64_t>());
      }
    } else {
      Bad(key, "must be an integer or a list of integers");
    }
    return out;
  }
  const json& j() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  const json& j_;
  std::string source_;
  std::string prefix_;
};

json ParseJson(const std::string& text, const std::string& source) {
  try {
    return ParseJsonBounded(text);
  } catch (const json::exception& e) {
    Fail(source, ": malformed JSON: ", e.what());
  }
}

RopeConfig ParseRope(const Fields& top, const ModelConfig& cfg) {
  RopeConfig r;
  // transformers 5 spelling: everything under rope_parameters. Older spelling: rope_theta at
  // the top and an optional rope_scaling object with "type" or "rope_type".
  const char* obj_key = nullptr;
  if (top.Has("rope_parameters")) {
    obj_key = "rope_parameters";
  } else if (top.Has("rope_scaling")) {
    obj_key = "rope_scaling";
  }
  r.theta = top.Num("rope_theta", 10000.0);
  if (top.Has("partial_rotary_factor") && top.Num("partial_rotary_factor") != 1.0)
    top.Bad("partial_rotary_factor", "is not supported (only 1.0)");
  // Pretraining context for llama3/yarn: inside the dict, else a top-level field (Phi-3 style),
  // else max_position_embeddings, as transformers' standardize_rope_params does.
  r.original_max_position_embeddings =
      top.Int("original_max_position_embeddings", cfg.max_position_embeddings);
  if (obj_key == nullptr) return r;

  const json& obj = top.j().at(obj_key);
  if (!obj.is_object()) top.Bad(obj_key, "must be an object");
  Fields f(obj, top.source(), std::string(obj_key) + ".");
  // Per-layer-type rope dicts (Gemma-style) nest objects; needle's architectures never do.
  for (auto it = obj.begin(); it != obj.end(); ++it)
    if (it.value().is_object())
      f.Bad(it.key().c_str(), "is a nested rope dictionary, which needle does not support");
  r.theta = f.Num("rope_theta", r.theta);
  std::string type = f.Str("rope_type", f.Str("type", "default"));
  if (f.Has("partial_rotary_factor") && f.Num("partial_rotary_factor") != 1.0)
    f.Bad("partial_rotary_factor", "is not supported (only 1.0)");
  const char* type_key = f.Has("rope_type") ? "rope_type" : "type";
  if (type == "default") {
    r.type = RopeType::kDefault;
  } else if (type == "linear") {
    r.type = RopeType::kLinear;
  } else if (type == "dynamic") {
    r.type = RopeType::kDynamic;
  } else if (type == "yarn") {
    r.type = RopeType::kYarn;
  } else if (type == "llama3") {
    r.type = RopeType::kLlama3;
  } else {
    f.Bad(type_key,
          "names an unsupported rope type (supported: default, linear, dynamic, yarn, llama3)");
  }
  if (r.theta <= 0) f.Bad("rope_theta", "must be positive");

  r.original_max_position_embeddings =
      f.Int("original_max_position_embeddings", r.original_max_position_embeddings);

  switch (r.type) {
    case RopeType::kDefault:
      break;
    case RopeType::kLinear:
    case RopeType::kDynamic:
      r.factor = f.Num("factor");
      if (r.factor < 1.0) f.Bad("factor", "must be at least 1");
      break;
    case RopeType::kLlama3:
      r.factor = f.Num("factor");
      r.low_freq_factor = f.Num("low_freq_factor");
      r.high_freq_factor = f.Num("high_freq_factor");
      if (r.factor <= 0) f.Bad("factor", "must be positive");
      if (r.high_freq_factor <= r.low_freq_factor)
        f.Bad("high_freq_factor", "must be larger than low_freq_factor");
      if (r.original_max_position_embeddings <= 0)
        f.Bad("original_max_position_embeddings", "must be positive");
      break;
    case RopeType::kYarn:
      if (r.original_max_position_embeddings <= 0)
        f.Bad("original_max_position_embeddings", "must be positive");
      r.factor = f.Has("factor") ? f.Num("factor")
                                 : static_cast<double>(cfg.max_position_embeddings) /
                                       static_cast<double>(r.original_max_position_embeddings);
      if (r.factor <= 0) f.Bad("factor", "must be positive");
      r.attention_factor = f.Num("attention_factor", 0.0);
      r.mscale = f.Num("mscale", 0.0);
      r.mscale_all_dim = f.Num("mscale_all_dim", 0.0);
      // transformers treats 0/None as "use the default" for the betas.
      r.beta_fast = f.Num("beta_fast", 0.0);
      if (r.beta_fast == 0.0) r.beta_fast = 32.0;
      r.beta_slow = f.Num("beta_slow", 0.0);
      if (r.beta_slow == 0.0) r.beta_slow = 1.0;
      r.truncate = f.Bool("truncate", true);
      break;
  }
  return r;
}

}  // namespace

ModelConfig ParseModelConfig(const std::string& text, const std::string& source) {
  json j = ParseJson(text, source);
  if (!j.is_object()) Fail(source, ": expected a JSON object at the top level");
  Fields f(j, source);
  ModelConfig c;
  c.source = source;

  std::string arch;
  if (f.Has("architectures")) {
    const json& a = j.at("architectures");
    if (!a.is_array() || a.empty() || !a[0].is_string())
      f.Bad("architectures", "must be a non-empty list of strings");
    arch = a[0].get<std::string>();
  } else {
    std::string mt = f.Str("model_type", "");
    if (mt.empty()) Fail(source, ": neither 'architectures' nor 'model_type' is present");
    static const std::pair<const char*, const char*> kByType[] = {{"llama", "LlamaForCausalLM"},
                                                                  {"mistral", "MistralForCausalLM"},
                                                                  {"qwen2", "Qwen2ForCausalLM"},
                                                                  {"qwen3", "Qwen3ForCausalLM"}};
    for (auto& [t, a] : kByType)
      if (mt == t) arch = a;
    if (arch.empty())
      f.Bad("model_type",
            "names an unsupported model type (supported: llama, mistral, qwen2, qwen3)");
  }
  c.architecture = arch;
  if (arch == "LlamaForCausalLM") {
    c.arch = Arch::kLlama;
  } else if (arch == "MistralForCausalLM") {
    c.arch = Arch::kMistral;
  } else if (arch == "Qwen2ForCausalLM") {
    c.arch = Arch::kQwen2;
  } else if (arch == "Qwen3ForCausalLM") {
    c.arch = Arch::kQwen3;
  } else {
    f.Bad("architectures",
          "names an unsupported architecture (supported: LlamaForCausalLM, MistralForCausalLM, "
          "Qwen2ForCausalLM, Qwen3ForCausalLM)");
  }

  // Bounds far above any released model, so that no size computed from them can overflow
  // (config.h: kMaxVocab and the rest).
  c.vocab_size = f.PositiveInt("vocab_size", kMaxVocab);
  c.hidden_size = f.PositiveInt("hidden_size", kMaxHidden);
  c.intermediate_size = f.PositiveInt("intermediate_size", kMaxIntermediate);
  c.num_layers = f.PositiveInt("num_hidden_layers", kMaxLayers);
  c.num_heads = f.PositiveInt("num_attention_heads", kMaxHeads);
  c.num_kv_heads =
      f.Has("num_key_value_heads") ? f.PositiveInt("num_key_value_heads", kMaxHeads) : c.num_heads;
  if (c.num_heads % c.num_kv_heads != 0)
    f.Bad("num_key_value_heads", Concat("must divide num_attention_heads (", c.num_heads, ")"));
  if (f.Has("head_dim")) {
    c.head_dim = f.PositiveInt("head_dim", kMaxHeadDim);
  } else {
    if (c.hidden_size % c.num_heads != 0)
      f.Bad("hidden_size", "is not a multiple of num_attention_heads and head_dim is not given");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) f.Bad("head_dim", "must be even for rotary embeddings");
  c.max_position_embeddings = f.Has("max_position_embeddings")
                                  ? f.PositiveInt("max_position_embeddings", kMaxContext)
                                  : 2048;
  c.rms_norm_eps = f.Num("rms_norm_eps", 1e-6);
  if (!(c.rms_norm_eps > 0)) f.Bad("rms_norm_eps", "must be positive");
  c.tie_word_embeddings = f.Bool("tie_word_embeddings", false);
  std::string act = f.Str("hidden_act", "silu");
  if (act != "silu") f.Bad("hidden_act", "is not supported (only silu)");

  switch (c.arch) {
    case Arch::kLlama:
      c.qkv_bias = c.o_bias = f.Bool("attention_bias", false);
      c.mlp_bias = f.Bool("mlp_bias", false);
      break;
    case Arch::kMistral:
      break;
    case Arch::kQwen2:
      c.qkv_bias = true;
      break;
    case Arch::kQwen3:
      c.qkv_bias = c.o_bias = f.Bool("attention_bias", false);
      c.qk_norm = true;
      break;
  }

  c.rope = ParseRope(f, c);

  // Sliding windows: Mistral applies config.sliding_window to every layer; Qwen2/3 only when
  // use_sliding_window, to the layers that layer_types (or max_window_layers) marks.
  c.sliding_window.assign(static_cast<size_t>(c.num_layers), 0);
  int64_t window = f.Int("sliding_window", 0);
  if (window < 0) f.Bad("sliding_window", "must not be negative");
  if (c.arch == Arch::kMistral) {
    for (auto& w : c.sliding_window) w = window;
  } else if (c.arch == Arch::kQwen2 || c.arch == Arch::kQwen3) {
    bool use = f.Bool("use_sliding_window", false);
    if (use && window > 0) {
      if (f.Has("layer_types")) {
        const json& lt = j.at("layer_types");
        if (!lt.is_array() || static_cast<int64_t>(lt.size()) != c.num_layers)
          f.Bad("layer_types", "must list one type per layer");
        for (size_t i = 0; i < lt.size(); ++i) {
          if (!lt[i].is_string()) f.Bad("layer_types", "must hold strings");
          std::string t = lt[i].get<std::string>();
          if (t == "sliding_attention") {
            c.sliding_window[i] = window;
          } else if (t != "full_attention") {
            f.Bad("layer_types", Concat("has unknown layer type '", t, "'"));
          }
        }
      } else {
        const int64_t from = f.Int("max_window_layers", c.num_layers);
        if (from < 0) f.Bad("max_window_layers", "must not be negative");
        for (int64_t i = from; i < c.num_layers; ++i) c.sliding_window[i] = window;
      }
    }
  }

  c.bos_token_ids = f.IntList("bos_token_id");
  c.eos_token_ids = f.IntList("eos_token_id");
  c.weight_dtype = f.Str("dtype", f.Str("torch_dtype", ""));
  return c;
}

ModelConfig LoadModelConfig(const std::string& path) {
  return ParseModelConfig(ReadTextFile(path), path);
}

void MergeGenerationConfig(const std::string& path, ModelConfig* cfg) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return;  // optional file
  json j = ParseJson(ReadTextFile(path), path);
  if (!j.is_object()) Fail(path, ": expected a JSON object at the top level");
  Fields f(j, path);
  std::set<int64_t> seen(cfg->eos_token_ids.begin(), cfg->eos_token_ids.end());
  for (int64_t id : f.IntList("eos_token_id"))
    if (seen.insert(id).second) cfg->eos_token_ids.push_back(id);
  if (cfg->bos_token_ids.empty()) cfg->bos_token_ids = f.IntList("bos_token_id");
}

std::string DescribeConfig(const ModelConfig& c) {
  std::ostringstream os;
  os << "architecture        " << c.architecture << "\n"
     << "layers              " << c.num_layers << "\n"
     << "hidden_size         " << c.hidden_size << "\n"
     << "intermediate_size   " << c.intermediate_size << "\n"
     << "heads / kv_heads    " << c.num_heads << " / " << c.num_kv_heads << " (group "
     << c.group_size() << ")\n"
     << "head_dim            " << c.head_dim << "\n"
     << "vocab_size          " << c.vocab_size << "\n"
     << "max_position_emb.   " << c.max_position_embeddings << "\n"
     << "rope                " << RopeTypeName(c.rope.type) << " theta=" << c.rope.theta;
  if (c.rope.type != RopeType::kDefault) os << " factor=" << c.rope.factor;
  if (c.rope.type == RopeType::kLlama3 || c.rope.type == RopeType::kYarn)
    os << " original_max_position_embeddings=" << c.rope.original_max_position_embeddings;
  os << "\n"
     << "tied embeddings     " << (c.tie_word_embeddings ? "yes" : "no") << "\n"
     << "qkv bias / qk norm  " << (c.qkv_bias ? "yes" : "no") << " / " << (c.qk_norm ? "yes" : "no")
     << "\n";
  int64_t sw = 0;
  for (auto w : c.sliding_window) sw = std::max(sw, w);
  if (sw > 0) os << "sliding window      " << sw << "\n";
  return os.str();
}

}  // namespace needle
