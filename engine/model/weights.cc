#include "engine/model/weights.h"

#include <sys/stat.h>

#include <iostream>
#include <nlohmann/json.hpp>
#include <set>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"
#include "engine/base/mapped_file.h"

namespace needle {

using json = nlohmann::json;

namespace {
// Sum of of(w) over the distinct present weights (a tied head is the embedding's view: once).
template <typename F>
int64_t SumDistinct(const ModelWeights& weights, F&& of) {
  int64_t n = 0;
  std::set<const void*> seen;
  ForEachWeight(const_cast<ModelWeights&>(weights), [&](Weight& w) {
    if (w.present() && seen.insert(w.data).second) n += of(w);
  });
  return n;
}
}  // namespace

size_t ModelWeights::TotalBytes() const {
  return static_cast<size_t>(
      SumDistinct(*this, [](const Weight& w) { return static_cast<int64_t>(w.nbytes()); }));
}

int64_t ModelWeights::Parameters() const {
  return SumDistinct(*this, [](const Weight& w) { return w.rows * w.cols; });
}

std::vector<WeightSpec> ExpectedWeights(const ModelConfig& c) {
  std::vector<WeightSpec> s;
  const int64_t H = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate_size;
  s.push_back({"model.embed_tokens.weight", c.vocab_size, H, true, false});
  s.push_back({"model.norm.weight", 1, H, true, true});
  s.push_back({"lm_head.weight", c.vocab_size, H, !c.tie_word_embeddings, false});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    s.push_back({p + "input_layernorm.weight", 1, H, true, true});
    s.push_back({p + "self_attn.q_proj.weight", Q, H, true, false});
    s.push_back({p + "self_attn.k_proj.weight", KV, H, true, false});
    s.push_back({p + "self_attn.v_proj.weight", KV, H, true, false});
    s.push_back({p + "self_attn.o_proj.weight", H, Q, true, false});
    s.push_back({p + "self_attn.q_proj.bias", 1, Q, c.qkv_bias, true});
    s.push_back({p + "self_attn.k_proj.bias", 1, KV, c.qkv_bias, true});
    s.push_back({p + "self_attn.v_proj.bias", 1, KV, c.qkv_bias, true});
    s.push_back({p + "self_attn.o_proj.bias", 1, H, c.o_bias, true});
    s.push_back({p + "self_attn.q_norm.weight", 1, c.head_dim, c.qk_norm, true});
    s.push_back({p + "self_attn.k_norm.weight", 1, c.head_dim, c.qk_norm, true});
    s.push_back({p + "post_attention_layernorm.weight", 1, H, true, true});
    s.push_back({p + "mlp.gate_proj.weight", I, H, true, false});
    s.push_back({p + "mlp.up_proj.weight", I, H, true, false});
    s.push_back({p + "mlp.down_proj.weight", H, I, true, false});
    s.push_back({p + "mlp.gate_proj.bias", 1, I, c.mlp_bias, true});
    s.push_back({p + "mlp.up_proj.bias", 1, I, c.mlp_bias, true});
    s.push_back({p + "mlp.down_proj.bias", 1, H, c.mlp_bias, true});
  }
  return s;
}

namespace {

bool FileExists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// The shard file names of an index, validated.
std::vector<std::string> ShardsFromIndex(const std::string& index_path,
                                         std::map<std::string, std::string>* weight_map) {
  json j;
  try {
    j = ParseJsonBounded(ReadTextFile(index_path));
  } catch (const json::exception& e) {
    Fail(index_path, ": malformed JSON: ", e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    Fail(index_path, ": field 'weight_map' is missing or not an object");
  std::vector<std::string> shards;
  std::set<std::string> seen;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      Fail(index_path, ": field 'weight_map.", it.key(), "' must be a file name string");
    std::string f = it.value().get<std::string>();
    if (f.find('/') != std::string::npos)
      Fail(index_path, ": field 'weight_map.", it.key(),
           "' names a file outside the model folder: ", f);
    (*weight_map)[it.key()] = f;
    if (seen.insert(f).second) shards.push_back(f);
  }
  return shards;
}

}  // namespace

ModelWeights LoadWeights(const std::string& dir, const ModelConfig& cfg) {
  ModelWeights mw;
  std::map<std::string, const TensorInfo*> all;
  const std::string single = dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> files;
  if (FileExists(index)) {
    for (const auto& f : ShardsFromIndex(index, &weight_map)) files.push_back(dir + "/" + f);
  } else if (FileExists(single)) {
    files.push_back(single);
  } else {
    Fail(dir, ": no model.safetensors or model.safetensors.index.json in the model folder");
  }
  for (const auto& f : files) {
    mw.files.push_back(std::make_unique<SafetensorsFile>(f));
    for (const auto& [name, t] : mw.files.back()->tensors()) {
      auto [it, inserted] = all.emplace(name, &t);
      if (!inserted)
        Fail(f, ": tensor '", name, "' is also in ", *it->second->file,
             " (duplicate across shards)");
    }
  }
  for (const auto& [name, file] : weight_map) {
    auto it = all.find(name);
    if (it == all.end())
      Fail(index, ": tensor '", name, "' is listed in weight_map but not found in ",
           dir + "/" + file);
  }

  mw.layers.resize(static_cast<size_t>(cfg.num_layers));
  const std::vector<WeightSpec> specs = ExpectedWeights(cfg);
  std::set<std::string> used;
  size_t k = 0;
  std::map<DType, size_t> bytes_by_type;
  const std::string where = files.size() == 1 ? files[0] : index;
  ForEachWeight(mw, [&](Weight& w) {
    const WeightSpec& s = specs[k++];
    w.name = s.name;
    auto it = all.find(s.name);
    if (it == all.end()) {
      if (s.required) Fail(where, ": missing tensor '", s.name, "' (required by ", cfg.source, ")");
      return;
    }
    const TensorInfo& t = *it->second;
    used.insert(s.name);
    if (!IsFloatWeightType(t.dtype))
      Fail(*t.file, ": tensor '", s.name, "' has dtype ", DTypeName(t.dtype),
           "; weights must be F32, F16 or BF16");
    const bool ok = s.is_vector
                        ? (t.shape.size() == 1 && t.shape[0] == s.cols)
                        : (t.shape.size() == 2 && t.shape[0] == s.rows && t.shape[1] == s.cols);
    if (!ok) {
      std::string want =
          s.is_vector ? Concat("[", s.cols, "]") : Concat("[", s.rows, ", ", s.cols, "]");
      Fail(*t.file, ": tensor '", s.name, "' has shape ", t.ShapeString(), " but ", cfg.source,
           " implies ", want);
    }
    w.dtype = t.dtype;
    w.rows = s.rows;
    w.cols = s.cols;
    w.data = t.data;
    if (!s.is_vector) bytes_by_type[t.dtype] += t.nbytes;
  });
  if (!mw.lm_head.present()) {
    mw.lm_head = mw.embed;
    mw.lm_head.name = "lm_head.weight (tied to model.embed_tokens.weight)";
  }
  size_t best = 0;
  for (auto& [t, n] : bytes_by_type)
    if (n > best) best = n, mw.dtype = t;

  size_t unused = 0;
  std::string example;
  for (const auto& [name, t] : all) {
    if (used.count(name) || name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (unused++ == 0) example = name;
  }
  if (unused > 0)
    std::cerr << "needle: warning: " << unused << " tensor(s) in " << dir << " are not used by the "
              << cfg.architecture << " graph (for example '" << example << "')\n";
  return mw;
}

}  // namespace needle
