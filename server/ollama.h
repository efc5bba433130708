// Ollama's API as needle serves it (issue 20), beside OpenAI's (server/openai.h), so that the
// applications and clients written for Ollama (the `ollama` npm and Python packages, Open WebUI,
// ...) talk to needle unchanged:
//   POST /api/generate  {model, prompt, system, raw, context, stream (default true), options}
//   POST /api/chat      {model, messages, stream (default true), options}
//     -> one JSON object, or newline-delimited JSON objects while streaming, the last with
//        done: true, done_reason, the token counts and durations (ns), and /api/generate's
//        context (the prompt's and answer's token ids, to send back to go on from there).
//   GET /api/tags, GET /api/ps, POST /api/show, GET /api/version, GET / ("needle is running").
// Errors are Ollama's {"error": "..."} with the status of the same ApiError as OpenAI's.
//
// The mapping, and where it differs from Ollama:
// - options: temperature, top_k, top_p, min_p, seed, num_predict (-1 and -2: until the context
//   is full or the model stops), stop (strings), num_ctx (this request's context, at most the
//   server's), repeat_penalty with repeat_last_n -1 (needle's penalty covers the whole
//   context; another window is refused); typical_p 1, presence_penalty and frequency_penalty 0
//   (off) and no other value. The server's own settings (num_gpu, num_thread, num_batch,
//   main_gpu, use_mmap, use_mlock, numa, low_vram, num_keep) are accepted and have no effect per
//   request: the command line decides them. Any other option is refused, naming it.
// - Sampling defaults are needle's (greedy, as `needle generate`), not a Modelfile's: /api/show
//   lists them as the model's parameters.
// - format, images, tools, think, suffix and a template are refused, not ignored; keep_alive is
//   accepted (the model stays loaded while the server runs).
// - A request without a prompt (generate) or with no messages (chat) is Ollama's "load the
//   model": done at once, done_reason "load".
// - Model names: the served name, alone or with the tag ":latest".
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model/config.h"
#include "server/openai.h"

namespace needle {
class Model;
}

namespace needle::server {

struct OllamaRequest {
  // chat; model; messages (chat) or prompts[0].text (generate); max_tokens (-1: until the
  // context is full); max_tokens_field; sampling; stop; stream.
  CompletionRequest r;
  bool raw = false;              // generate: the prompt as it is, no chat template
  std::string system;            // generate: a system message
  std::vector<int32_t> context;  // generate: token ids an earlier answer returned, prepended
  int64_t num_ctx = 0;           // options.num_ctx: this request's context (0: the server's)
  bool load_only = false;        // no prompt or no messages: Ollama's "load the model"
};

// given names the served model: "NAME" or "NAME:latest".
bool SameOllamaModel(const std::string& given, const std::string& served);

// Parses a body of /api/generate (chat false) or /api/chat. Throws ApiError naming the field
// ("options.top_k", "messages[1].images", ...): 400 for the request, 404 for another model.
OllamaRequest ParseOllama(const std::string& body, bool chat, const std::string& served);

// {"error": "..."}
std::string OllamaErrorBody(const ApiError& e);

// RFC 3339 in UTC with nanoseconds, as Ollama's created_at and modified_at.
std::string OllamaTime(std::chrono::system_clock::time_point t);

// What the last object of an answer adds.
struct OllamaDone {
  std::string reason;  // "stop", "length" or "load"
  int64_t prompt_tokens = 0, eval_tokens = 0;
  double total_seconds = 0, prompt_seconds = 0, eval_seconds = 0;
  const std::vector<int32_t>* context = nullptr;  // generate: prompt + answer ids
};
// One object of an answer: text as "response" (generate) or as the assistant's message (chat);
// done: null for a streamed piece (done: false), else the last object with its counts.
nlohmann::json OllamaObject(const OllamaRequest& q, const std::string& created_at,
                            const std::string& text, const OllamaDone* done);

// What /api/tags, /api/ps and /api/show say of the model served.
struct ServedModel {
  std::string name;         // the served name (listed as NAME:latest)
  std::string modified_at;  // the weights' modification time (OllamaTime)
  int64_t size_bytes = 0;   // the weights' bytes
  std::string digest;       // hex hash of config.json's bytes (the weights are not read)
  std::string dtype;        // the weights' type, e.g. "BF16"
  int64_t parameters = 0;
  int64_t context = 0;   // the server's context (--ctx-size)
  std::string chat;      // the chat template's family ("none": the prompt as it is)
  std::string sampling;  // the default parameters, one "name value" a line
  ModelConfig config;
};
// The model `model` loaded from folder `dir` (empty: not from files; size and time then from the
// weights in memory and now), served with a context of `context` tokens and chat template `chat`.
ServedModel DescribeServedModel(const std::string& name, const std::string& dir, const Model& model,
                                int64_t context, const std::string& chat);
nlohmann::json OllamaModelEntry(const ServedModel& m);  // an entry of /api/tags and /api/ps
nlohmann::json OllamaShow(const ServedModel& m);        // /api/show's body
// "7.6B", "25.3M": Ollama's parameter_size.
std::string ParameterSize(int64_t parameters);

}  // namespace needle::server
