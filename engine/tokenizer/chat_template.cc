#include "engine/tokenizer/chat_template.h"

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"
#include "engine/base/mapped_file.h"

namespace needle {

const char* ChatFamilyName(ChatFamily f) {
  switch (f) {
    case ChatFamily::kLlama3:
      return "llama3";
    case ChatFamily::kChatML:
      return "chatml";
    case ChatFamily::kMistral:
      return "mistral";
    default:
      return "none";
  }
}

ChatFamily ParseChatFamily(const std::string& s, const std::string& what) {
  if (s == "llama3") return ChatFamily::kLlama3;
  if (s == "chatml" || s == "qwen") return ChatFamily::kChatML;
  if (s == "mistral") return ChatFamily::kMistral;
  if (s == "none") return ChatFamily::kNone;
  Fail(what, ": unknown chat template '", s, "' (expected llama3, chatml, mistral or none)");
}

ChatFamily DetectChatFamily(const std::string& t) {
  if (t.find("<|start_header_id|>") != std::string::npos) return ChatFamily::kLlama3;
  if (t.find("<|im_start|>") != std::string::npos) return ChatFamily::kChatML;
  if (t.find("[INST]") != std::string::npos) return ChatFamily::kMistral;
  return ChatFamily::kNone;
}

namespace {
std::string TokenString(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return "";
}

std::string Trim(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}
}  // namespace

namespace {
// Without a chat_template, config.json's architecture still names some families.
ChatFamily FamilyFromConfigJson(const std::string& dir) {
  const std::string path = dir + "/config.json";
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return ChatFamily::kNone;
  try {
    const auto j = ParseJsonBounded(ReadTextFile(path));
    const std::string mt = j.value("model_type", "");
    if (mt == "qwen2" || mt == "qwen3") return ChatFamily::kChatML;
    if (mt == "mistral") return ChatFamily::kMistral;
  } catch (const nlohmann::json::exception&) {
  }
  return ChatFamily::kNone;  // llama: Llama-2 and Llama-3 chats differ; the template must say
}
}  // namespace

ChatFamily DetectChatFamilyFromFolder(const std::string& dir, std::string* bos, std::string* eos) {
  const std::string path = dir + "/tokenizer_config.json";
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return FamilyFromConfigJson(dir);
  nlohmann::json j;
  try {
    j = ParseJsonBounded(ReadTextFile(path));
  } catch (const nlohmann::json::exception& e) {
    Fail(path, ": malformed JSON: ", e.what());
  }
  if (bos != nullptr && j.contains("bos_token")) *bos = TokenString(j["bos_token"]);
  if (eos != nullptr && j.contains("eos_token")) *eos = TokenString(j["eos_token"]);
  if (j.contains("chat_template") && j["chat_template"].is_string())
    return DetectChatFamily(j["chat_template"].get<std::string>());
  return FamilyFromConfigJson(dir);
}

std::string FormatChat(ChatFamily f, const std::vector<ChatMessage>& messages,
                       const std::string& bos, const std::string& eos) {
  std::string out;
  switch (f) {
    case ChatFamily::kLlama3:
      // Llama-3: bos, then per message a header, the trimmed content and <|eot_id|>.
      out = bos;
      for (const auto& m : messages)
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + Trim(m.content) +
               "<|eot_id|>";
      out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    case ChatFamily::kChatML:
      for (const auto& m : messages)
        out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      out += "<|im_start|>assistant\n";
      return out;
    case ChatFamily::kMistral: {
      out = bos;
      std::string system;
      size_t turn = 0;
      for (const auto& m : messages) {
        if (m.role == "system") {
          if (turn != 0) Fail("chat template mistral: a system message must come first");
          system = m.content;
          continue;
        }
        const bool expect_user = turn % 2 == 0;
        if ((m.role == "user") != expect_user || (m.role != "user" && m.role != "assistant"))
          Fail("chat template mistral: roles must alternate user/assistant (message ", turn + 1,
               " is '", m.role, "')");
        if (m.role == "user") {
          const std::string content =
              turn == 0 && !system.empty() ? system + "\n\n" + m.content : m.content;
          out += "[INST] " + content + " [/INST]";
        } else {
          out += m.content + eos;
        }
        ++turn;
      }
      return out;
    }
    case ChatFamily::kNone:
      break;
  }
  // No template: the raw concatenation of the contents.
  for (const auto& m : messages) out += m.content;
  return out;
}

}  // namespace needle
