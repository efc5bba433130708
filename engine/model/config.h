// The model hyper-parameters needle needs, read from a Hugging Face config.json in either
// spelling: the hub's older one (top-level rope_theta, rope_scaling with "type" or "rope_type")
// and the one transformers 5 writes (rope_parameters). Every problem names the file and field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace needle {

// What config.json may ask for: far above any released model (vocabularies of 256K, hidden 16K,
// 128 layers), low enough that no size computed from them (vocab x hidden x 4 bytes, a layer's
// weights, the KV cache of a token) can overflow 64 bits; positions stay below 2^31 (the GPU
// kernels index them in 32 bits). A config above them is refused naming the field.
constexpr int64_t kMaxVocab = int64_t{1} << 24, kMaxHidden = int64_t{1} << 17,
                  kMaxIntermediate = int64_t{1} << 20, kMaxLayers = 1024, kMaxHeads = 1024,
                  kMaxHeadDim = 1024, kMaxContext = (int64_t{1} << 31) - 1;

enum class Arch { kLlama, kMistral, kQwen2, kQwen3 };
const char* ArchName(Arch a);

enum class RopeType { kDefault, kLinear, kDynamic, kYarn, kLlama3 };
const char* RopeTypeName(RopeType t);

struct RopeConfig {
  RopeType type = RopeType::kDefault;
  double theta = 10000.0;
  double factor = 1.0;  // linear, dynamic, yarn, llama3
  // llama3 and yarn: the pretraining context; dynamic scales against max_position_embeddings.
  int64_t original_max_position_embeddings = 0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  double beta_fast = 32.0;        // yarn
  double beta_slow = 1.0;         // yarn
  double attention_factor = 0.0;  // yarn: 0 = derived from factor (and mscale, mscale_all_dim)
  double mscale = 0.0;            // yarn (DeepSeek-style), 0 = unset
  double mscale_all_dim = 0.0;    // yarn, 0 = unset
  bool truncate = true;           // yarn: round the correction range to whole dims
};

struct ModelConfig {
  std::string source;  // path of config.json, for messages
  Arch arch = Arch::kLlama;
  std::string architecture;  // as written, e.g. "LlamaForCausalLM"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // q/k/v projections have biases (Qwen2; Llama attention_bias)
  bool o_bias = false;    // o_proj has a bias (Llama attention_bias)
  bool mlp_bias = false;  // Llama mlp_bias
  bool qk_norm = false;   // Qwen3: RMSNorm over head_dim on q and k before RoPE
  RopeConfig rope;
  // Per layer: 0 = full causal attention, W > 0 = each query sees its last W keys (itself
  // included).
  std::vector<int64_t> sliding_window;
  std::vector<int64_t> bos_token_ids;
  std::vector<int64_t> eos_token_ids;
  std::string weight_dtype;  // "dtype"/"torch_dtype" as written, informational

  int64_t group_size() const { return num_heads / num_kv_heads; }
  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
};

// Parses config.json text; `source` names the file in errors.
ModelConfig ParseModelConfig(const std::string& json_text, const std::string& source);
ModelConfig LoadModelConfig(const std::string& path);
// Adds EOS ids from generation_config.json (when the file exists) to cfg.eos_token_ids.
void MergeGenerationConfig(const std::string& path, ModelConfig* cfg);

// A human-readable summary, one field per line.
std::string DescribeConfig(const ModelConfig& cfg);

}  // namespace needle
