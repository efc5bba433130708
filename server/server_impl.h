// The parts of needle serve that its API front ends share (server.cc: the engine thread and
// OpenAI's API; ollama_routes.cc: Ollama's): a request's sequence (Job), its text as tokens
// arrive (TextState), and the server's state (Server::Impl). Internal to server/.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "server/ollama.h"
#include "server/openai.h"
#include "server/server.h"

namespace needle::server {

// One request's sequence, shared by its HTTP worker and the engine thread.
struct Job {
  SequenceRequest req;  // (moved into the engine when it is submitted)
  std::mutex m;
  std::condition_variable cv;
  std::vector<int32_t> tokens;           // produced so far
  std::vector<TokenLogprob> lps;         // theirs, when asked for
  std::vector<TokenLogprob> prompt_lps;  // the prompt's (echo with logprobs), at the first token
  bool finished = false;                 // no more tokens will come
  int error_status = 0;                  // the engine refused or failed it
  std::string error;
  GenerateStats st;
  // When it was made, and when its first and latest tokens came (Ollama's durations).
  std::chrono::steady_clock::time_point made = std::chrono::steady_clock::now(), first, last;
  int64_t seq = -1;              // the engine's id (engine thread only)
  bool want_prompt_lps = false;  // (set before it is submitted)
};

// A request's text as its tokens arrive: decoded, cut at the first stop string.
struct TextState {
  explicit TextState(const Tokenizer& t) : dec(t, true) {}
  StreamDecoder dec;
  std::string text;
  size_t used = 0;       // tokens decoded
  bool stopped = false;  // a stop string was found (text ends before it)
};

// A non-streamed request's sequences, waited for in turn: each one's text as its tokens came.
struct Whole {
  Whole(std::vector<std::shared_ptr<Job>> j, const CompletionRequest& req, const Tokenizer& t)
      : jobs(std::move(j)), r(req) {
    for (size_t i = 0; i < jobs.size(); ++i) st.emplace_back(t);
  }
  std::vector<std::shared_ptr<Job>> jobs;
  std::deque<TextState> st;  // jobs[i]'s
  CompletionRequest r;
  size_t done = 0;  // jobs[0, done) have finished (or one failed: then all count as done)
};
// The body of a whole response once its sequences are done; *status: 200, or an error's.
using WholeBody = std::function<std::string(Whole& w, int* status)>;

struct Server::Impl {
  Impl(Model& m, const Tokenizer& t, const EngineOptions& e, const ServerOptions& o,
       PolicyFactory p)
      : model(m),
        tok(t),
        eo(e),
        so(o),
        policy(std::move(p)),
        engine(std::make_unique<Engine>(m, e)),
        served(DescribeServedModel(o.model_name, o.model_dir, m, e.max_context,
                                   ChatFamilyName(o.chat))) {}

  Model& model;
  const Tokenizer& tok;
  EngineOptions eo;
  ServerOptions so;
  PolicyFactory policy;
  std::unique_ptr<Engine> engine;  // the engine thread's alone once started
  const ServedModel served;        // what Ollama's /api/tags and /api/show say of the model
  httplib::Server http;
  std::thread engine_thread, http_thread;
  std::mutex m;  // guards what follows
  std::condition_variable cv;
  bool stopping = false;
  std::deque<std::shared_ptr<Job>> incoming;
  std::vector<std::shared_ptr<Job>> cancels;
  std::atomic<int64_t> waiting{0}, running{0}, cached{0}, reused{0}, ids{0};
  std::atomic<int64_t> preempted{0}, preemptions{0};  // swapped out now; so far (Engine)
  std::atomic<int64_t> abandoned{0};  // sequences cancelled because their client went away

  void Submit(const std::shared_ptr<Job>& j) {
    std::lock_guard<std::mutex> lk(m);
    incoming.push_back(j);
    cv.notify_one();
  }
  void Cancel(const std::shared_ptr<Job>& j) {
    std::lock_guard<std::mutex> lk(m);
    cancels.push_back(j);
    cv.notify_one();
  }
  static void Finish(Job& j, int status, const std::string& error) {
    std::lock_guard<std::mutex> lk(j.m);
    j.finished = true;
    j.error_status = status;
    j.error = error;
    j.cv.notify_all();
  }

  void EngineLoop();
  void Routes();
  // An error's body in the API of the path asked for: Ollama's under /api/ and /, else OpenAI's.
  static void SetError(const httplib::Request& req, httplib::Response& res, const ApiError& e);
  void Complete(const httplib::Request& req, httplib::Response& res, bool chat);
  // Ollama's API (ollama_routes.cc).
  void OllamaRoutes();
  void Ollama(const httplib::Request& req, httplib::Response& res, bool chat);
  // Decodes j's new tokens into st; true when the request is done (finished or stopped).
  bool Advance(Job& j, TextState& st, const CompletionRequest& r);
  // A chat's prompt: the messages in the chat template (none: their contents, a line each).
  // Throws ApiError 400 (messages) for a conversation the template refuses.
  std::vector<int32_t> ChatTokens(const std::vector<ChatMessage>& messages) const;
  // Throws ApiError 400 naming `param` for a token id outside the model's vocabulary.
  void CheckIds(const std::vector<int32_t>& ids, const std::string& param) const;
  // The tokens to generate after `prompt` in a context of C tokens: r.max_tokens, or when not
  // given (-1) up to the context (to_context) or 16 (OpenAI's default for completions). Throws
  // ApiError 400 naming the prompt or r.max_tokens_field when they do not fit; limit: what set C.
  static int64_t Budget(const std::vector<int32_t>& prompt, const CompletionRequest& r,
                        bool to_context, int64_t C, const std::string& limit);
  // A request's sequence (its own sparse planner when the server has one).
  std::shared_ptr<Job> NewJob(const std::vector<int32_t>& prompt, int64_t max_new,
                              const CompletionRequest& r) const;
  // Streaming: the bytes a stop string could begin with (held back until they cannot), and how
  // much of st's text may be sent now (never inside a UTF-8 character; at least `sent`).
  static size_t Hold(const std::vector<std::string>& stop);
  static size_t Sendable(const TextState& st, size_t sent, size_t hold, bool done);
  // Waits for w's sequences until `until`: true when all are done (a sequence cut by a stop string
  // is cancelled; one that failed cancels the rest).
  bool Poll(Whole& w, std::chrono::steady_clock::time_point until);
  // A non-streamed response: body(w) once w's sequences are done. Within so.whole_grace it is
  // sent with its status; after that, 200 is sent with a space every so.keepalive until the body
  // comes, so that a client that has gone is noticed (a write fails) and its sequences cancelled.
  void RespondWhole(httplib::Response& res, const std::shared_ptr<Whole>& w, const WholeBody& body);
  // A client that went away: its sequence is cancelled unless it has finished.
  void Abandon(const std::shared_ptr<Job>& job);
  // Why j's text ended: "stop" (a stop string or EOS) or "length".
  static const char* Reason(Job& j, const TextState& st);
  // A token's logprobs as the response shows them.
  LogprobEntry Entry(const TokenLogprob& t) const;
  // An echoed prompt's: its first token (nothing before it), then the scored ones.
  std::vector<LogprobEntry> PromptEntries(int32_t first,
                                          const std::vector<TokenLogprob>& lps) const;
};

}  // namespace needle::server
