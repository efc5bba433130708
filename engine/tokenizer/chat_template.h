// Chat prompt formatting for the families needle knows, written to produce exactly what each
// family's Jinja chat_template produces (tests/test_chat.cc compares against the real templates
// rendered with jinja2): Llama-3, ChatML (Qwen2/2.5/3) and Mistral [INST].
#pragma once

#include <string>
#include <vector>

namespace needle {

enum class ChatFamily { kNone, kLlama3, kChatML, kMistral };

struct ChatMessage {
  std::string role;  // system, user, assistant
  std::string content;
};

const char* ChatFamilyName(ChatFamily f);
// "llama3", "chatml" (or "qwen"), "mistral", "none"; throws naming `what` otherwise.
ChatFamily ParseChatFamily(const std::string& s, const std::string& what);
// Recognises the family from a chat_template string (kNone when unknown).
ChatFamily DetectChatFamily(const std::string& chat_template);
// Reads tokenizer_config.json of a model folder (missing file: kNone); bos/eos get its tokens.
ChatFamily DetectChatFamilyFromFolder(const std::string& model_dir, std::string* bos,
                                      std::string* eos);

// The prompt for `messages`, ending with the assistant's turn header (add_generation_prompt).
// Throws Error for conversations the family's template rejects (Mistral: roles must alternate
// user/assistant; a system message is prepended to the first user turn).
std::string FormatChat(ChatFamily f, const std::vector<ChatMessage>& messages,
                       const std::string& bos, const std::string& eos);

}  // namespace needle
