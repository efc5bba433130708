// Chat formatting against the real templates rendered with jinja2 (tests/fixtures/chat/).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "engine/base/mapped_file.h"
#include "engine/tokenizer/chat_template.h"
#include "tests/test_util.h"

namespace needle {
namespace {

TEST(Chat, MatchesRenderedTemplates) {
  const auto j = nlohmann::json::parse(
      ReadTextFile(std::string(NEEDLE_FIXTURES_DIR) + "/../chat/expected.json"));
  const struct {
    const char* name;
    ChatFamily family;
    const char* bos;
    const char* eos;
  } fams[] = {{"qwen3", ChatFamily::kChatML, "", "<|im_end|>"},
              {"llama3", ChatFamily::kLlama3, "<|begin_of_text|>", "<|end_of_text|>"},
              {"mistral", ChatFamily::kMistral, "<s>", "</s>"}};
  for (const auto& f : fams) {
    for (size_t c = 0; c < j["conversations"].size(); ++c) {
      if (j[f.name][c].is_null()) continue;  // the template rejects this conversation
      std::vector<ChatMessage> msgs;
      for (const auto& m : j["conversations"][c]) msgs.push_back({m["role"], m["content"]});
      EXPECT_EQ(FormatChat(f.family, msgs, f.bos, f.eos), j[f.name][c].get<std::string>())
          << f.name << " #" << c;
    }
  }
}

TEST(Chat, DetectionAndErrors) {
  EXPECT_EQ(DetectChatFamily("{{ '<|im_start|>' }}"), ChatFamily::kChatML);
  EXPECT_EQ(DetectChatFamily("<|start_header_id|>"), ChatFamily::kLlama3);
  EXPECT_EQ(DetectChatFamily("[INST]"), ChatFamily::kMistral);
  EXPECT_EQ(DetectChatFamily("{{ messages }}"), ChatFamily::kNone);
  test::ExpectErrorContaining([] { ParseChatFamily("vicuna", "--chat-template"); },
                              {"--chat-template", "vicuna"});
  test::ExpectErrorContaining(
      [] {
        FormatChat(ChatFamily::kMistral, {{"assistant", "x"}}, "<s>", "</s>");
      },
      {"mistral", "alternate"});
  // Mistral: a system message goes in front of the first user turn.
  EXPECT_EQ(
      FormatChat(ChatFamily::kMistral, {{"system", "Be brief."}, {"user", "Hi"}}, "<s>", "</s>"),
      "<s>[INST] Be brief.\n\nHi [/INST]");
}

}  // namespace
}  // namespace needle
