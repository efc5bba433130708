// Bad model files: every malformation gives an Error naming the file and the tensor or field.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "engine/backend/backend.h"
#include "engine/base/mapped_file.h"
#include "engine/model/model.h"
#include "engine/model/safetensors.h"
#include "tests/test_util.h"

namespace needle {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::ExpectErrorContaining;
using test::TempDir;
using test::WriteFile;

std::string LengthPrefix(const std::string& header) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header;
}

// A file with the given header JSON and `data_bytes` bytes of data.
std::string Build(const json& header, size_t data_bytes) {
  return LengthPrefix(header.dump()) + std::string(data_bytes, '\x01');
}

json OneTensor(const std::string& dtype, std::vector<int64_t> shape, uint64_t b, uint64_t e) {
  return json{{"w", {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {b, e}}}}};
}

TEST(Safetensors, ReadsValidFile) {
  TempDir d;
  json h = OneTensor("BF16", {2, 3}, 0, 12);
  h["b"] = {{"dtype", "F32"}, {"shape", {3}}, {"data_offsets", {12, 24}}};
  h["__metadata__"] = {{"format", "pt"}};
  WriteFile(d.File("m.safetensors"), Build(h, 24));
  SafetensorsFile f(d.File("m.safetensors"));
  ASSERT_NE(f.Find("w"), nullptr);
  EXPECT_EQ(f.Find("w")->dtype, DType::kBF16);
  EXPECT_EQ(f.Find("w")->numel(), 6);
  EXPECT_EQ(f.Find("b")->nbytes, 12u);
  EXPECT_EQ(f.tensors().size(), 2u);
}

TEST(Safetensors, Truncated) {
  TempDir d;
  WriteFile(d.File("t.safetensors"), "abc");
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("t.safetensors")); },
                        {d.File("t.safetensors"), "truncated"});
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  TempDir d;
  std::string bytes = LengthPrefix("{}");
  bytes[0] = 100;  // claims a 100-byte header in a 10-byte file
  WriteFile(d.File("h.safetensors"), bytes);
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("h.safetensors")); },
                        {d.File("h.safetensors"), "header length 100 exceeds"});
}

TEST(Safetensors, MalformedHeader) {
  TempDir d;
  WriteFile(d.File("j.safetensors"), LengthPrefix("{\"w\": {\"dtype\": "));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("j.safetensors")); },
                        {d.File("j.safetensors"), "malformed"});
}

TEST(Safetensors, UnknownDType) {
  TempDir d;
  WriteFile(d.File("u.safetensors"), Build(OneTensor("Q4_K", {4}, 0, 4), 4));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("u.safetensors")); },
                        {"u.safetensors", "'w'", "unknown dtype 'Q4_K'"});
}

TEST(Safetensors, OffsetsOutOfRange) {
  TempDir d;
  WriteFile(d.File("o.safetensors"), Build(OneTensor("F32", {4}, 0, 16), 8));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("o.safetensors")); },
                        {"o.safetensors", "'w'", "past the data section"});
  WriteFile(d.File("r.safetensors"), Build(OneTensor("F32", {0}, 8, 4), 8));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("r.safetensors")); },
                        {"r.safetensors", "'w'", "reversed"});
}

TEST(Safetensors, SizeDisagreesWithShape) {
  TempDir d;
  WriteFile(d.File("s.safetensors"), Build(OneTensor("F16", {3, 3}, 0, 16), 16));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("s.safetensors")); },
                        {"s.safetensors", "'w'", "[3, 3]", "needs 18"});
}

TEST(Safetensors, OverlappingTensors) {
  TempDir d;
  json h = OneTensor("F32", {8}, 0, 32);
  h["inner"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {8, 16}}};
  h["empty"] = {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {4, 4}}};
  WriteFile(d.File("v.safetensors"), Build(h, 32));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("v.safetensors")); },
                        {"v.safetensors", "overlap", "'inner'", "'w'"});
}

TEST(Safetensors, BadShapeEntries) {
  TempDir d;
  json h = {{"w", {{"dtype", "F32"}, {"shape", {-1}}, {"data_offsets", {0, 4}}}}};
  WriteFile(d.File("n.safetensors"), Build(h, 4));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("n.safetensors")); },
                        {"n.safetensors", "'w'", "shape"});
  json g = {{"w", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0}}}}};
  WriteFile(d.File("g.safetensors"), Build(g, 4));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("g.safetensors")); },
                        {"g.safetensors", "'w'", "data_offsets"});
  // A shape whose byte count wraps in 64 bits ([2^62, 2] bf16 once "needed" 0 bytes and passed
  // with data_offsets [0, 0]).
  json w = {
      {"w", {{"dtype", "BF16"}, {"shape", {uint64_t{1} << 62, 2}}, {"data_offsets", {0, 0}}}}};
  WriteFile(d.File("w.safetensors"), Build(w, 0));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("w.safetensors")); },
                        {"w.safetensors", "'w'", "shape dimension 0", "larger than 2^56"});
  // A shape nested 200,000 deep: refused while parsing the header, no stack overflow.
  const std::string deep = std::string(200000, '[') + "1" + std::string(200000, ']');
  WriteFile(d.File("deep.safetensors"), LengthPrefix(R"({"w": {"dtype": "F32", "shape": [)" + deep +
                                                     R"(], "data_offsets": [0, 4]}})") +
                                            std::string(4, '\x01'));
  ExpectErrorContaining([&] { SafetensorsFile f(d.File("deep.safetensors")); },
                        {"deep.safetensors", "nested more than 256 levels"});
}

// Model-level checks on a copy of a real fixture.
class BadModel : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = std::string(NEEDLE_FIXTURES_DIR) + "/llama_gqa4_hd64_f32";
    for (const char* f : {"config.json", "model.safetensors", "generation_config.json"})
      fs::copy_file(src_ + "/" + f, dir_.File(f));
  }
  void Load() {
    ThreadingContext tc(1);
    auto b = MakeCpuBackend(tc, false);
    LoadModel(dir_.path(), *b);
  }
  // Rewrites model.safetensors after editing its header (data kept).
  void EditHeader(const std::function<void(json&)>& edit) {
    const std::string bytes = ReadTextFile(dir_.File("model.safetensors"));
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
    json h = json::parse(bytes.substr(8, n));
    edit(h);
    WriteFile(dir_.File("model.safetensors"), LengthPrefix(h.dump()) + bytes.substr(8 + n));
  }
  std::string src_;
  TempDir dir_;
};

TEST_F(BadModel, LoadsWhenIntact) { EXPECT_NO_THROW(Load()); }

TEST_F(BadModel, TruncatedWeights) {
  const std::string bytes = ReadTextFile(dir_.File("model.safetensors"));
  WriteFile(dir_.File("model.safetensors"), bytes.substr(0, bytes.size() / 2));
  ExpectErrorContaining([&] { Load(); }, {"model.safetensors", "past the data section"});
}

TEST_F(BadModel, MissingTensor) {
  EditHeader([](json& h) { h.erase("model.layers.1.mlp.up_proj.weight"); });
  ExpectErrorContaining(
      [&] { Load(); }, {"model.safetensors", "missing tensor 'model.layers.1.mlp.up_proj.weight'"});
}

TEST_F(BadModel, ShapeDisagreesWithConfig) {
  json cfg = json::parse(ReadTextFile(dir_.File("config.json")));
  cfg["intermediate_size"] = 80;
  WriteFile(dir_.File("config.json"), cfg.dump());
  ExpectErrorContaining([&] { Load(); },
                        {"model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[64, 56]",
                         "[80, 56]", "config.json"});
}

TEST_F(BadModel, NonFloatWeight) {
  EditHeader([](json& h) {
    auto& t = h["model.norm.weight"];
    t["dtype"] = "I32";  // same byte size as F32, so only the type check can catch it
  });
  ExpectErrorContaining([&] { Load(); }, {"model.safetensors", "model.norm.weight", "I32"});
}

TEST_F(BadModel, MalformedOrIncompleteConfig) {
  WriteFile(dir_.File("config.json"), "{\"architectures\": [\"LlamaForCausalLM\"]");
  ExpectErrorContaining([&] { Load(); }, {"config.json", "malformed JSON"});
  WriteFile(dir_.File("config.json"),
            R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 256})");
  ExpectErrorContaining([&] { Load(); }, {"config.json", "hidden_size"});
  fs::remove(dir_.File("config.json"));
  ExpectErrorContaining([&] { Load(); }, {"config.json", "cannot open"});
}

TEST_F(BadModel, UnsupportedArchitecture) {
  json cfg = json::parse(ReadTextFile(dir_.File("config.json")));
  cfg["architectures"] = {"MixtralForCausalLM"};
  WriteFile(dir_.File("config.json"), cfg.dump());
  ExpectErrorContaining([&] { Load(); }, {"config.json", "architectures", "MixtralForCausalLM"});
}

TEST_F(BadModel, NoWeightsFile) {
  fs::remove(dir_.File("model.safetensors"));
  ExpectErrorContaining([&] { Load(); }, {dir_.path(), "no model.safetensors"});
}

TEST_F(BadModel, ShardIndexProblems) {
  // An index naming a tensor that its shard does not hold, and one naming a missing shard.
  fs::rename(dir_.File("model.safetensors"), dir_.File("model-00001-of-00001.safetensors"));
  json idx = {{"metadata", {{"total_size", 1}}},
              {"weight_map",
               {{"model.norm.weight", "model-00001-of-00001.safetensors"},
                {"model.extra.weight", "model-00001-of-00001.safetensors"}}}};
  WriteFile(dir_.File("model.safetensors.index.json"), idx.dump());
  ExpectErrorContaining([&] { Load(); }, {"model.safetensors.index.json", "model.extra.weight"});
  idx["weight_map"]["model.extra.weight"] = "model-00002-of-00002.safetensors";
  WriteFile(dir_.File("model.safetensors.index.json"), idx.dump());
  ExpectErrorContaining([&] { Load(); }, {"model-00002-of-00002.safetensors", "cannot open"});
  WriteFile(dir_.File("model.safetensors.index.json"), "{\"weight_map\": 3}");
  ExpectErrorContaining([&] { Load(); }, {"model.safetensors.index.json", "weight_map"});
}

}  // namespace
}  // namespace needle
