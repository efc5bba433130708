// Chat templates (engine/tokenizer/chat_template.h): tokenizer_config.json of a model folder
// (the family from its chat_template, bos and eos tokens), then the prompt of a conversation
// taken from the same input (after the first NUL: role/content pairs separated by NULs) in every
// family. A template that rejects the conversation throws Error; nothing else may happen.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/base/error.h"
#include "engine/tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = "/tmp/needle-fuzz-chat-" + std::to_string(::getpid());
  static const bool made = ::mkdir(dir.c_str(), 0700) == 0 || errno == EEXIST;
  if (!made) return 0;
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t cut = in.find('\0');
  {
    FILE* f = std::fopen((dir + "/tokenizer_config.json").c_str(), "wb");
    if (f == nullptr) std::abort();
    const std::string cfg = in.substr(0, cut);
    std::fwrite(cfg.data(), 1, cfg.size(), f);
    std::fclose(f);
  }
  std::string bos, eos;
  try {
    needle::DetectChatFamilyFromFolder(dir, &bos, &eos);
  } catch (const needle::Error&) {
  }
  std::vector<needle::ChatMessage> msgs;
  if (cut != std::string::npos) {
    std::vector<std::string> parts;
    size_t at = cut + 1;
    while (at <= in.size()) {
      const size_t e = std::min(in.find('\0', at), in.size());
      parts.push_back(in.substr(at, e - at));
      at = e + 1;
    }
    for (size_t i = 0; i + 1 < parts.size(); i += 2) msgs.push_back({parts[i], parts[i + 1]});
  }
  for (needle::ChatFamily f : {needle::ChatFamily::kNone, needle::ChatFamily::kLlama3,
                               needle::ChatFamily::kChatML, needle::ChatFamily::kMistral}) {
    try {
      needle::FormatChat(f, msgs, bos, eos);
    } catch (const needle::Error&) {
    }
  }
  return 0;
}
