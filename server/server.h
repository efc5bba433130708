// needle serve (issue 20): OpenAI's and Ollama's completion APIs over HTTP (cpp-httplib, Debian's
// libcpp-httplib-dev), every request a sequence of one Engine (engine/runtime/engine.h): the
// requests of all clients are batched by its scheduler, a client that disconnects has its
// sequence cancelled (its blocks freed): streamed at its next write, whole at the next keep-alive
// space (ServerOptions::keepalive). Endpoints:
//   GET  /health               {"status": "ok", waiting / running sequences, prompts kept in the
//                              prefix cache, prompt tokens reused so far, sequences cancelled
//                              because their clients went away}
//   GET  /v1/models            the one model served
//   POST /v1/completions       prompt (text or token ids) -> text; "stream": server-sent events
//   POST /v1/chat/completions  messages -> the model's chat template -> text; "stream" too
//   Ollama's API under /api/ (server/ollama.h): generate, chat, tags, ps, show, version
// Request bodies are checked field by field (server/openai.h); errors are OpenAI's JSON error
// objects with 400 (the request), 401 (--api-key), 404 (model or path), 413 (body size).
//
// Threads: cpp-httplib's workers parse requests and wait for their tokens; one engine thread
// owns the Engine (the model is not thread-safe): it takes new requests and cancellations from
// a queue, steps, and hands each request its tokens. It sleeps while there is nothing to do.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "engine/model/model.h"
#include "engine/runtime/engine.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"

namespace needle::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                      // 0: any free port (Start returns it)
  std::string api_key;                  // non-empty: required as "Authorization: Bearer KEY"
  std::string model_name;               // what "model" must name, and /v1/models lists
  size_t max_body = 8 << 20;            // request body bytes (larger: 413)
  ChatFamily chat = ChatFamily::kNone;  // the chat template (kNone: the messages' contents
                                        // joined, for models without one)
  std::string bos, eos;                 // the template's special tokens
  // A non-streamed response not ready within whole_grace is sent as 200 with a space every
  // keepalive until its body (JSON may begin with white space): a client that has gone is then
  // noticed and its sequences cancelled. Within whole_grace, an error keeps its own status.
  std::chrono::milliseconds whole_grace{2000}, keepalive{1000};
  std::string model_dir;  // where the model was loaded from (Ollama's /api/tags: its files' size,
                          // time and digest); empty: described from the weights in memory
};

// A new sequence's attention policy (a sparse planner of its own), or null for dense; ctx: its
// prompt and answer's tokens.
using PolicyFactory = std::function<std::unique_ptr<SparseAttention>(int64_t ctx)>;

class Server {
 public:
  Server(Model& model, const Tokenizer& tok, const EngineOptions& engine, const ServerOptions& opt,
         PolicyFactory policy = nullptr);
  ~Server();  // Stop()
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port (Error naming them when it cannot), starts the engine thread and the HTTP
  // server's; returns the port bound.
  int Start();
  // Blocks until Stop (from another thread or a signal handler's thread).
  void Wait();
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace needle::server
