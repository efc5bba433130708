#include <gtest/gtest.h>

#include "engine/model/config.h"
#include "engine/model/rope.h"
#include "tests/test_util.h"

namespace needle {
namespace {

using test::ExpectErrorContaining;

std::string Base(const std::string& extra, const std::string& arch = "LlamaForCausalLM") {
  return R"({"architectures": [")" + arch + R"("], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 4096)" +
         extra + "}";
}

TEST(Config, BothRopeSpellingsAgree) {
  struct Case {
    std::string modern, legacy;
    RopeType type;
  };
  const Case cases[] = {
      {R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0})",
       R"(, "rope_theta": 500000.0, "rope_scaling": null)", RopeType::kDefault},
      {R"(, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})",
       R"(, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0})",
       RopeType::kLinear},
      {R"(, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})",
       R"(, "rope_scaling": {"type": "dynamic", "factor": 2.0})", RopeType::kDynamic},
      {R"(, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})",
       R"(, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})",
       RopeType::kLlama3},
      {R"(, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
          "original_max_position_embeddings": 32768})",
       R"(, "rope_theta": 1000000.0, "rope_scaling": {"type": "yarn", "factor": 4.0,
          "original_max_position_embeddings": 32768})",
       RopeType::kYarn},
  };
  for (const auto& c : cases) {
    ModelConfig a = ParseModelConfig(Base(c.modern), "modern.json");
    ModelConfig b = ParseModelConfig(Base(c.legacy), "legacy.json");
    EXPECT_EQ(a.rope.type, c.type);
    EXPECT_EQ(b.rope.type, c.type);
    EXPECT_EQ(a.rope.theta, b.rope.theta);
    EXPECT_EQ(a.rope.factor, b.rope.factor);
    EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
    EXPECT_EQ(ComputeRopeFreqs(a, 8192).inv_freq, ComputeRopeFreqs(b, 8192).inv_freq);
  }
}

TEST(Config, DefaultsAndDerivedFields) {
  ModelConfig c = ParseModelConfig(Base(""), "c.json");
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.group_size(), 2);
  EXPECT_EQ(c.rope.type, RopeType::kDefault);
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  // head_dim that is not hidden_size / heads (Qwen3 style)
  ModelConfig q = ParseModelConfig(Base(R"(, "head_dim": 128)", "Qwen3ForCausalLM"), "q.json");
  EXPECT_EQ(q.head_dim, 128);
  EXPECT_TRUE(q.qk_norm);
  ModelConfig q2 = ParseModelConfig(Base("", "Qwen2ForCausalLM"), "q2.json");
  EXPECT_TRUE(q2.qkv_bias);
  EXPECT_FALSE(q2.o_bias);
}

TEST(Config, SlidingWindowPerLayer) {
  ModelConfig m =
      ParseModelConfig(Base(R"(, "sliding_window": 4096)", "MistralForCausalLM"), "m.json");
  EXPECT_EQ(m.sliding_window, (std::vector<int64_t>{4096, 4096}));
  ModelConfig m2 =
      ParseModelConfig(Base(R"(, "sliding_window": null)", "MistralForCausalLM"), "m.json");
  EXPECT_EQ(m2.sliding_window, (std::vector<int64_t>{0, 0}));
  // Qwen2: only with use_sliding_window, and only from max_window_layers on.
  ModelConfig q = ParseModelConfig(
      Base(R"(, "sliding_window": 32, "use_sliding_window": true, "max_window_layers": 1)",
           "Qwen2ForCausalLM"),
      "q.json");
  EXPECT_EQ(q.sliding_window, (std::vector<int64_t>{0, 32}));
  ModelConfig q2 = ParseModelConfig(
      Base(R"(, "sliding_window": 32, "use_sliding_window": false)", "Qwen2ForCausalLM"), "q.json");
  EXPECT_EQ(q2.sliding_window, (std::vector<int64_t>{0, 0}));
  ModelConfig q3 = ParseModelConfig(
      Base(
          R"(, "sliding_window": 8, "use_sliding_window": true, "layer_types": ["sliding_attention", "full_attention"])",
          "Qwen3ForCausalLM"),
      "q.json");
  EXPECT_EQ(q3.sliding_window, (std::vector<int64_t>{8, 0}));
}

TEST(Config, EosIdsAcceptIntOrList) {
  EXPECT_EQ(ParseModelConfig(Base(R"(, "eos_token_id": 7)"), "c").eos_token_ids,
            (std::vector<int64_t>{7}));
  EXPECT_EQ(ParseModelConfig(Base(R"(, "eos_token_id": [7, 9])"), "c").eos_token_ids,
            (std::vector<int64_t>{7, 9}));
}

TEST(Config, BadInputNamesFileFieldAndValue) {
  ExpectErrorContaining([] { ParseModelConfig("{\"vocab_size\": 3,", "/m/config.json"); },
                        {"/m/config.json", "malformed JSON"});
  ExpectErrorContaining([] { ParseModelConfig("[1, 2]", "/m/config.json"); },
                        {"/m/config.json", "object"});
  ExpectErrorContaining(
      [] {
        ParseModelConfig(
            R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4})",
            "/m/config.json");
      },
      {"/m/config.json", "hidden_size", "missing"});
  ExpectErrorContaining([] { ParseModelConfig(Base("", "GPT2LMHeadModel"), "c.json"); },
                        {"c.json", "architectures", "GPT2LMHeadModel", "unsupported"});
  ExpectErrorContaining(
      [] {
        ParseModelConfig(Base(R"(, "rope_scaling": {"type": "longrope", "factor": 2.0})"),
                         "c.json");
      },
      {"c.json", "rope_scaling.type", "longrope"});
  ExpectErrorContaining(
      [] { ParseModelConfig(Base(R"(, "rope_scaling": {"type": "linear"})"), "c.json"); },
      {"c.json", "rope_scaling.factor", "missing"});
  ExpectErrorContaining([] { ParseModelConfig(Base(R"(, "hidden_act": "gelu")"), "c.json"); },
                        {"c.json", "hidden_act", "gelu"});
  ExpectErrorContaining([] { ParseModelConfig(Base(R"(, "rms_norm_eps": -1)"), "c.json"); },
                        {"c.json", "rms_norm_eps"});
  ExpectErrorContaining([] { ParseModelConfig(Base(R"(, "vocab_size": 0)"), "c.json"); },
                        {"c.json", "vocab_size", "positive"});
}

// Values a hostile config.json can hold, each once a crash or an out-of-bounds write (issue 21):
// now an error naming the file, the field and the value, before anything is sized from it.
TEST(Config, HostileValuesAreNamedErrors) {
  const std::string qwen_swa = R"(, "use_sliding_window": true, "sliding_window": 64)";
  ExpectErrorContaining(
      [&] {
        ParseModelConfig(Base(qwen_swa + R"(, "max_window_layers": -5)", "Qwen2ForCausalLM"),
                         "c.json");
      },
      {"c.json", "max_window_layers", "must not be negative", "-5"});
  ExpectErrorContaining(
      [&] {
        ParseModelConfig(
            Base(qwen_swa + R"(, "max_window_layers": -100000000)", "Qwen2ForCausalLM"), "c.json");
      },
      {"c.json", "max_window_layers", "must not be negative"});
  ExpectErrorContaining([] { ParseModelConfig(Base(R"(, "vocab_size": 1e30)"), "c.json"); },
                        {"c.json", "vocab_size", "must be an integer", "1e+30"});
  ExpectErrorContaining(
      [] { ParseModelConfig(Base(R"(, "vocab_size": 18446744073709551615)"), "c.json"); },
      {"c.json", "vocab_size", "out of range"});
  ExpectErrorContaining(
      [] { ParseModelConfig(Base(R"(, "vocab_size": 4611686018427387904)"), "c.json"); },
      {"c.json", "vocab_size", "above needle's limit of 16777216"});
  ExpectErrorContaining(
      [] { ParseModelConfig(Base(R"(, "num_hidden_layers": 1000000000)"), "c.json"); },
      {"c.json", "num_hidden_layers", "above needle's limit of 1024"});
  // A number too large for a double: the parser's own out_of_range error (found by fuzz_config),
  // which escaped as a bare library exception.
  ExpectErrorContaining(
      [] { ParseModelConfig(Base(R"(, "vocab_size": 2222221e30555)"), "c.json"); },
      {"c.json", "malformed JSON", "number overflow"});
  // Nested 80,000 deep: refused while parsing (copying or printing such a value recurses).
  test::ExpectErrorContaining(
      [&] {
        ParseModelConfig(
            Base(", \"vocab_size\": " + std::string(80000, '[') + "1" + std::string(80000, ']')),
            "c.json");
      },
      {"c.json", "malformed JSON", "nested more than 256 levels"});
  // Nested within the bound: the message shows one level, without recursing through the value.
  const std::string deep = std::string(200, '[') + "1" + std::string(200, ']');
  try {
    ParseModelConfig(Base(", \"vocab_size\": " + deep), "c.json");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("c.json: field 'vocab_size' must be an integer (value: [[...]])"),
              std::string::npos)
        << m.substr(0, 300);
    EXPECT_LT(m.size(), 300u);
  }
}

TEST(Config, HeadsMustDivide) {
  const std::string j =
      R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3})";
  ExpectErrorContaining([&] { ParseModelConfig(j, "c.json"); },
                        {"c.json", "num_key_value_heads", "3"});
  const std::string k =
      R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 60,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8})";
  ExpectErrorContaining([&] { ParseModelConfig(k, "c.json"); }, {"c.json", "hidden_size"});
  const std::string s =
      R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": "four"})";
  ExpectErrorContaining([&] { ParseModelConfig(s, "c.json"); },
                        {"c.json", "num_attention_heads", "\"four\"", "integer"});
}

}  // namespace
}  // namespace needle
