// OpenAI request bodies (server/openai.h): the input as a POST /v1/completions body and as a
// /v1/chat/completions one. ParseCompletion either returns a request or throws ApiError (the
// client's 4xx); a parsed request's response bodies and stream chunks, with the input's bytes as
// the generated text (a model's text may be any bytes), must serialise. Anything else (another
// exception, a sanitizer report, a crash) is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "server/openai.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  for (bool chat : {false, true}) {
    try {
      const needle::server::CompletionRequest r = needle::server::ParseCompletion(in, chat, "m");
      const std::string text = in.substr(0, 64);
      needle::server::Dump(needle::server::CompletionBody(r, "id", 0, text, "stop", {3, 4}));
      const needle::server::Usage u{1, 2};
      needle::server::StreamChunk(r, "id", 0, text, "", &u);
      needle::server::StreamRoleChunk(r, "id", 0);
      needle::server::StopAt(text, r.stop);
    } catch (const needle::server::ApiError& e) {
      if (e.status < 400 || e.status > 499) __builtin_trap();
      needle::server::ErrorBody(e);
    }
  }
  return 0;
}
