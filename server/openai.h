// OpenAI's completion APIs as needle serves them (issue 20): the requests of POST /v1/completions
// and POST /v1/chat/completions parsed and checked field by field, and the response bodies
// (whole, or as server-sent-event chunks). Pure functions of JSON and strings: tested without a
// socket. What needle does not do yet (n > 1, best_of, the presence/frequency penalties) is
// refused with a 400 that names the field, never ignored.
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

// One prompt of /v1/completions: a text, or token ids.
struct PromptInput {
  std::string text;          // (empty when ids were given)
  std::vector<int32_t> ids;  // token ids given as the prompt
};

struct CompletionRequest {
  bool chat = false;
  std::string model;
  // completions: one or more prompts ("prompt" a string, token ids, or an array of either); each
  // is a choice of the response, index i for prompt i.
  std::vector<PromptInput> prompts;
  std::vector<ChatMessage> messages;
  int64_t max_tokens = -1;  // -1: not given (completions: 16, OpenAI's default; chat: the
                            // context); 0 only with echo (the prompt scored, nothing generated)
  std::string max_tokens_field =
      "max_tokens";  // the field that gave it (chat: or max_completion_tokens)
  SamplingParams sampling;
  std::vector<std::string> stop;  // at most 4, none empty
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // Log-probabilities: -1 none; k >= 0 each token's and the k most likely (completions:
  // "logprobs": k; chat: "logprobs": true with "top_logprobs": k).
  int64_t logprobs = -1;
  bool echo = false;        // completions: the prompt comes back before the text (and its logprobs)
  bool ignore_eos = false;  // vLLM's extension: generate max_tokens whatever the model's EOS
};

constexpr int64_t kMaxTopLogprobs = 20;
constexpr size_t kMaxPrompts = 256;  // prompts of one /v1/completions request

// A chat request's "messages" (body["messages"]): a non-empty array of {role: system, user or
// assistant, content: a string}. Throws ApiError naming the message and field.
std::vector<ChatMessage> ParseMessages(const nlohmann::json& body);

// Parses a request body. served: the model's name, which "model" must equal (else 404).
// Throws ApiError naming the field for malformed JSON, wrong types, out-of-range values, an
// empty prompt or message list, unknown roles, and what needle does not support.
CompletionRequest ParseCompletion(const std::string& body, bool chat, const std::string& served);

// Where a generated text first contains one of the stop strings: the length to keep, or npos.
size_t StopAt(const std::string& text, const std::vector<std::string>& stop);

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};
// A token's log-probability as the response shows it: its text (the token decoded alone) and the
// most likely tokens at its place. has: false for a prompt's first token (nothing before it).
struct LogprobEntry {
  std::string text;
  bool has = false;
  float logprob = 0.f;
  std::vector<std::pair<std::string, float>> top;
};
// One choice of a response. logprobs: the entries of its tokens (echo: the prompt's first), or
// empty with the request's logprobs < 0.
struct Choice {
  std::string text;
  std::string finish;  // "stop" or "length"
  std::vector<LogprobEntry> logprobs;
};
// OpenAI's logprobs objects: /v1/completions' {tokens, token_logprobs, top_logprobs,
// text_offset} (offsets in bytes of the choice's text, from 0), /v1/chat/completions'
// {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}. first_offset:
// where e[0]'s text begins in the choice's text (a streamed chunk's entries continue the earlier
// chunks').
nlohmann::json CompletionLogprobs(const std::vector<LogprobEntry>& e, size_t first_offset = 0);
nlohmann::json ChatLogprobs(const std::vector<LogprobEntry>& e);
// The whole response: choice i with index i.
nlohmann::json CompletionBody(const CompletionRequest& r, const std::string& id, int64_t created,
                              const std::vector<Choice>& choices, const Usage& u);
// One server-sent event ("data: {...}\n\n") of a streamed response: a piece of text, or (finish
// non-empty) the last chunk with its finish reason; usage (non-null) goes in an extra last chunk
// of its own, as OpenAI's stream_options.include_usage does. logprobs: the chunk's tokens'
// (CompletionLogprobs' or ChatLogprobs' object), or null.
std::string StreamChunk(const CompletionRequest& r, const std::string& id, int64_t created,
                        const std::string& text, const std::string& finish,
                        const Usage* usage = nullptr, const nlohmann::json* logprobs = nullptr);
// The first chunk of a chat stream ({"role": "assistant"}).
std::string StreamRoleChunk(const CompletionRequest& r, const std::string& id, int64_t created);

}  // namespace needle::server
