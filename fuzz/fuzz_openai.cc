// OpenAI's and Ollama's request bodies (server/openai.h, server/ollama.h): the input as a POST
// /v1/completions body and as a /v1/chat/completions one, then as /api/generate and /api/chat.
// ParseCompletion either returns a request or throws ApiError (the client's 4xx); a parsed
// request's response bodies (logprobs included) and stream chunks, with the input's bytes as the
// generated text (a model's text may be any bytes), must serialise. Anything else (another
// exception, a sanitizer report, a crash) is a finding.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "server/ollama.h"
#include "server/openai.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  for (bool chat : {false, true}) {
    try {
      const needle::server::CompletionRequest r = needle::server::ParseCompletion(in, chat, "m");
      const std::string text = in.substr(0, 64);
      // One choice per prompt, with logprob entries whose token texts are the input's bytes.
      std::vector<needle::server::Choice> choices(std::max<size_t>(1, r.prompts.size()));
      for (auto& c : choices) {
        c.text = text, c.finish = "stop";
        c.logprobs.push_back({text.substr(0, 1), false, 0.f, {}});
        c.logprobs.push_back({text.substr(0, 3), true, -1.5f, {{text.substr(0, 2), -0.5f}}});
      }
      needle::server::Dump(needle::server::CompletionBody(r, "id", 0, choices, {3, 4}));
      const needle::server::Usage u{1, 2};
      needle::server::StreamChunk(r, "id", 0, text, "", &u);
      const nlohmann::json lp = r.chat ? needle::server::ChatLogprobs(choices[0].logprobs)
                                       : needle::server::CompletionLogprobs(choices[0].logprobs, 7);
      needle::server::StreamChunk(r, "id", 0, text, "", nullptr, &lp);
      needle::server::StreamRoleChunk(r, "id", 0);
      needle::server::StopAt(text, r.stop);
    } catch (const needle::server::ApiError& e) {
      if (e.status < 400 || e.status > 499) __builtin_trap();
      needle::server::ErrorBody(e);
    }
  }
  for (bool chat : {false, true}) {
    try {
      const needle::server::OllamaRequest q = needle::server::ParseOllama(in, chat, "m");
      const std::string text = in.substr(0, 64);
      const std::vector<int32_t> context = {1, 2, 3};
      needle::server::OllamaDone d;
      d.reason = "stop", d.context = &context;
      needle::server::Dump(needle::server::OllamaObject(q, "t", text, nullptr));
      needle::server::Dump(needle::server::OllamaObject(q, "t", text, &d));
      needle::server::StopAt(text, q.r.stop);
    } catch (const needle::server::ApiError& e) {
      if (e.status < 400 || e.status > 499) __builtin_trap();
      needle::server::OllamaErrorBody(e);
    }
  }
  return 0;
}
