// OpenAI's completion APIs as needle serves them (issue 20): the requests of POST /v1/completions
// and POST /v1/chat/completions parsed and checked field by field, and the response bodies
// (whole, or as server-sent-event chunks). Pure functions of JSON and strings: tested without a
// socket. What needle does not do yet (logprobs, echo, n > 1, the penalties) is refused with a
// 400 that names the field, never ignored.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model/sampling.h"
#include "engine/tokenizer/chat_template.h"

namespace needle::server {

// An error the client gets back: HTTP status, OpenAI's error object {message, type, param}.
struct ApiError : std::runtime_error {
  ApiError(int status, const std::string& message, const std::string& param = "",
           const std::string& type = "invalid_request_error")
      : std::runtime_error(message), status(status), param(param), type(type) {}
  int status;
  std::string param, type;
};
// j as one line of JSON, any invalid UTF-8 in its strings replaced by U+FFFD (a model's text may
// hold some; nlohmann's dump would throw).
std::string Dump(const nlohmann::json& j);
// {"error": {"message", "type", "param", "code"}}
std::string ErrorBody(const ApiError& e);

struct CompletionRequest {
  bool chat = false;
  std::string model;
  std::string prompt_text;          // completions: the text (empty when ids were given)
  std::vector<int32_t> prompt_ids;  // completions: token ids given as the prompt
  std::vector<ChatMessage> messages;
  int64_t max_tokens = 0;  // 0: not given (completions: 16, OpenAI's default; chat: the context)
  std::string max_tokens_field =
      "max_tokens";  // the field that gave it (chat: or max_completion_tokens)
  SamplingParams sampling;
  std::vector<std::string> stop;  // at most 4, none empty
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
};

// Parses a request body. served: the model's name, which "model" must equal (else 404).
// Throws ApiError naming the field for malformed JSON, wrong types, out-of-range values, an
// empty prompt or message list, unknown roles, and what needle does not support.
CompletionRequest ParseCompletion(const std::string& body, bool chat, const std::string& served);

// Where a generated text first contains one of the stop strings: the length to keep, or npos.
size_t StopAt(const std::string& text, const std::vector<std::string>& stop);

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};
// The whole response. finish: "stop" or "length".
nlohmann::json CompletionBody(const CompletionRequest& r, const std::string& id, int64_t created,
                              const std::string& text, const std::string& finish, const Usage& u);
// One server-sent event ("data: {...}\n\n") of a streamed response: a piece of text, or (finish
// non-empty) the last chunk with its finish reason; usage (non-null) goes in an extra last chunk
// of its own, as OpenAI's stream_options.include_usage does.
std::string StreamChunk(const CompletionRequest& r, const std::string& id, int64_t created,
                        const std::string& text, const std::string& finish,
                        const Usage* usage = nullptr);
// The first chunk of a chat stream ({"role": "assistant"}).
std::string StreamRoleChunk(const CompletionRequest& r, const std::string& id, int64_t created);

}  // namespace needle::server
