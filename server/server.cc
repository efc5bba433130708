#include "server/server.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/base/error.h"
#include "server/openai.h"

namespace needle::server {

namespace {

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

}  // namespace

struct Server::Impl {
  Impl(Model& m, const Tokenizer& t, const EngineOptions& e, const ServerOptions& o,
       PolicyFactory p)
      : model(m),
        tok(t),
        eo(e),
        so(o),
        policy(std::move(p)),
        engine(std::make_unique<Engine>(m, e)) {}

  Model& model;
  const Tokenizer& tok;
  EngineOptions eo;
  ServerOptions so;
  PolicyFactory policy;
  std::unique_ptr<Engine> engine;  // the engine thread's alone once started
  httplib::Server http;
  std::thread engine_thread, http_thread;
  std::mutex m;  // guards what follows
  std::condition_variable cv;
  bool stopping = false;
  std::deque<std::shared_ptr<Job>> incoming;
  std::vector<std::shared_ptr<Job>> cancels;
  std::atomic<int64_t> waiting{0}, running{0}, cached{0}, reused{0}, ids{0};

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
  void Complete(const httplib::Request& req, httplib::Response& res, bool chat);
  // Decodes j's new tokens into st; true when the request is done (finished or stopped).
  bool Advance(Job& j, TextState& st, const CompletionRequest& r);
  // A token's logprobs as the response shows them.
  LogprobEntry Entry(const TokenLogprob& t) const;
  // An echoed prompt's: its first token (nothing before it), then the scored ones.
  std::vector<LogprobEntry> PromptEntries(int32_t first,
                                          const std::vector<TokenLogprob>& lps) const;
};

std::vector<LogprobEntry> Server::Impl::PromptEntries(int32_t first,
                                                      const std::vector<TokenLogprob>& lps) const {
  std::vector<LogprobEntry> e = {{tok.Decode({first}), false, 0.f, {}}};
  for (const TokenLogprob& t : lps) e.push_back(Entry(t));
  return e;
}

LogprobEntry Server::Impl::Entry(const TokenLogprob& t) const {
  LogprobEntry e;
  e.text = tok.Decode({t.token});
  e.has = true;
  e.logprob = t.logprob;
  for (const auto& [top, lp] : t.top) e.top.emplace_back(tok.Decode({top}), lp);
  if (std::none_of(t.top.begin(), t.top.end(), [&](const auto& x) { return x.first == t.token; }))
    e.top.emplace_back(e.text, t.logprob);  // (OpenAI lists the chosen token too)
  return e;
}

void Server::Impl::EngineLoop() {
  std::map<int64_t, std::shared_ptr<Job>> live;
  for (;;) {
    std::deque<std::shared_ptr<Job>> add;
    std::vector<std::shared_ptr<Job>> drop;
    {
      std::unique_lock<std::mutex> lk(m);
      cv.wait(lk,
              [&] { return stopping || !incoming.empty() || !cancels.empty() || !engine->Idle(); });
      if (stopping) break;
      add.swap(incoming);
      drop.swap(cancels);
    }
    for (auto& j : add) {
      try {
        j->seq = engine->Submit(std::move(j->req));
        live[j->seq] = j;
      } catch (const std::exception& e) {
        Finish(*j, 400, e.what());
      }
    }
    for (auto& j : drop)
      if (j->seq >= 0 && live.erase(j->seq) != 0) {
        engine->Cancel(j->seq);
        Finish(*j, 0, "");
      }
    if (!engine->Idle()) {
      std::vector<TokenEvent> events;
      try {
        events = engine->Step();
      } catch (const std::exception& e) {
        // The step's state is unknown: every live request fails, the engine starts afresh.
        for (auto& [id, j] : live) Finish(*j, 500, std::string("the engine failed: ") + e.what());
        live.clear();
        engine = std::make_unique<Engine>(model, eo);
      }
      for (const TokenEvent& ev : events) {
        auto it = live.find(ev.seq);
        if (it == live.end()) continue;
        Job& j = *it->second;
        std::lock_guard<std::mutex> lk(j.m);
        if (j.tokens.empty() && j.seq >= 0 && j.want_prompt_lps)
          j.prompt_lps = engine->PromptLogprobs(ev.seq);
        j.tokens.push_back(ev.token);
        if (!ev.logprob.empty()) j.lps.push_back(ev.logprob[0]);
        if (ev.finished) j.st = engine->Stats(ev.seq), j.finished = true;
        j.cv.notify_all();
        if (ev.finished) live.erase(it);
      }
    }
    waiting = engine->Waiting();
    running = engine->Running();
    cached = engine->cached_prefixes();
    reused = engine->reused_tokens();
  }
  for (auto& [id, j] : live) Finish(*j, 503, "the server is stopping");
  std::lock_guard<std::mutex> lk(m);
  for (auto& j : incoming) Finish(*j, 503, "the server is stopping");
}

bool Server::Impl::Advance(Job& j, TextState& st, const CompletionRequest& r) {
  std::vector<int32_t> fresh;
  bool finished = false;
  {
    std::unique_lock<std::mutex> lk(j.m);
    j.cv.wait_for(lk, std::chrono::milliseconds(200),
                  [&] { return j.finished || j.tokens.size() > st.used; });
    fresh.assign(j.tokens.begin() + static_cast<long>(st.used), j.tokens.end());
    st.used = j.tokens.size();
    finished = j.finished;
  }
  size_t longest = 0;
  for (const auto& s : r.stop) longest = std::max(longest, s.size());
  for (int32_t t : fresh) {
    // (A stop string not in the text before this token can only end in its new bytes.)
    const size_t from = st.text.size() >= longest ? st.text.size() + 1 - longest : 0;
    st.text += st.dec.Push(t);
    if (r.stop.empty()) continue;
    size_t at = StopAt(st.text.substr(from), r.stop);
    if (at != std::string::npos) {
      at += from;
      st.text.resize(at);
      st.stopped = true;
      return true;
    }
  }
  if (!finished) return false;
  st.text += st.dec.Flush();
  const size_t at = StopAt(st.text, r.stop);
  if (at != std::string::npos) st.text.resize(at), st.stopped = true;
  return true;
}

void Server::Impl::Complete(const httplib::Request& req, httplib::Response& res, bool chat) {
  const auto refuse = [&](const ApiError& e) {
    res.status = e.status;
    res.set_content(ErrorBody(e), "application/json");
  };
  CompletionRequest r;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> echoed;  // echo: each prompt's text as it comes back
  std::vector<int64_t> max_new;     // each prompt's tokens to generate (max_tokens 0: 1)
  try {
    r = ParseCompletion(req.body, chat, so.model_name);
    if (chat) {
      std::string text;
      if (so.chat == ChatFamily::kNone) {
        for (const auto& msg : r.messages) text += (text.empty() ? "" : "\n") + msg.content;
      } else {
        try {
          text = FormatChat(so.chat, r.messages, so.bos, so.eos);
        } catch (const Error& e) {
          throw ApiError(400, e.what(), "messages");
        }
      }
      prompts.push_back(tok.Encode(text, false));
    }
    for (const PromptInput& in : r.prompts) {
      if (!in.ids.empty()) {
        for (int32_t id : in.ids)
          if (id >= model.config().vocab_size)
            throw ApiError(400,
                           "token id " + std::to_string(id) + " is outside the vocabulary of " +
                               std::to_string(model.config().vocab_size),
                           "prompt");
        prompts.push_back(in.ids);
      } else {
        prompts.push_back(tok.Encode(in.text, true));  // (as needle generate -p: the model's BOS)
      }
      if (r.echo) echoed.push_back(in.ids.empty() ? in.text : tok.Decode(in.ids));
    }
    const int64_t C = eo.max_context;
    const std::string param = chat ? "messages" : "prompt";
    for (const auto& prompt : prompts) {
      const int64_t P = static_cast<int64_t>(prompt.size());
      if (P == 0) throw ApiError(400, "the prompt has no tokens", param);
      if (P >= C)
        throw ApiError(400,
                       "the prompt has " + std::to_string(P) + " tokens; the context holds " +
                           std::to_string(C) + " (--ctx-size), answer included",
                       param);
      const int64_t n = r.max_tokens >= 0 ? r.max_tokens
                        : chat            ? C - P
                                          : std::min<int64_t>(16, C - P);
      if (P + std::max<int64_t>(n, 1) > C)
        throw ApiError(400,
                       "the prompt's " + std::to_string(P) + " tokens and max_tokens " +
                           std::to_string(n) + " exceed the context of " + std::to_string(C) +
                           " tokens (--ctx-size)",
                       r.max_tokens_field);
      max_new.push_back(std::max<int64_t>(n, 1));
    }
  } catch (const ApiError& e) {
    refuse(e);
    return;
  }
  // max_tokens 0 (echo): the prompt is scored and the token generated after it dropped.
  const bool score_only = r.max_tokens == 0;
  std::vector<std::shared_ptr<Job>> jobs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto job = std::make_shared<Job>();
    const int64_t P = static_cast<int64_t>(prompts[i].size());
    job->req.prompt = prompts[i];
    job->req.max_new = max_new[i];
    job->req.sampling = r.sampling;
    job->req.logprobs = r.logprobs;
    job->req.prompt_logprobs = job->want_prompt_lps = r.echo && r.logprobs >= 0;
    if (policy) job->req.policy = policy(P + job->req.max_new);
    jobs.push_back(job);
  }
  const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(ids++);
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  const auto reason = [](Job& j, const TextState& st) {
    std::lock_guard<std::mutex> lk(j.m);
    return st.stopped || j.st.stopped_at_eos ? "stop" : "length";
  };
  for (const auto& job : jobs) Submit(job);
  if (!r.stream) {
    std::vector<Choice> choices;
    Usage u;
    for (size_t i = 0; i < jobs.size(); ++i) {
      Job& job = *jobs[i];
      TextState st(tok);
      while (!Advance(job, st, r)) {
      }
      if (st.stopped) Cancel(jobs[i]);
      if (job.error_status != 0) {
        for (size_t k = i + 1; k < jobs.size(); ++k) Cancel(jobs[k]);
        refuse(ApiError(job.error_status, job.error, "", "server_error"));
        return;
      }
      Choice c;
      c.finish = score_only ? "length" : reason(job, st);
      std::lock_guard<std::mutex> lk(job.m);
      const size_t used = score_only ? 0 : st.used;
      u.prompt_tokens += static_cast<int64_t>(prompts[i].size());
      u.completion_tokens += static_cast<int64_t>(used);
      if (!score_only) c.text = st.text;
      if (r.logprobs >= 0) {
        if (r.echo) c.logprobs = PromptEntries(prompts[i][0], job.prompt_lps);
        // The generated tokens whose text begins before the end of what is returned (a stop
        // string cuts the text).
        size_t at = 0;
        for (size_t k = 0; k < used && k < job.lps.size(); ++k) {
          LogprobEntry e = Entry(job.lps[k]);
          if (st.stopped && at >= st.text.size()) break;
          at += e.text.size();
          c.logprobs.push_back(std::move(e));
        }
      }
      if (r.echo) c.text = echoed[i] + c.text;
      choices.push_back(std::move(c));
    }
    res.set_content(Dump(CompletionBody(r, id, created, choices, u)), "application/json");
    return;
  }
  // Streamed: text is sent as it is decoded, but the last bytes that could begin a stop string
  // are held back until they cannot. echo: the prompt's text first (with its logprobs, once the
  // first token brings them); logprobs: each chunk carries the entries of the tokens whose text
  // begins in it (those left at the end go with the last piece, cut by a stop string as the
  // whole response's are).
  const auto job = jobs[0];
  const int64_t P0 = static_cast<int64_t>(prompts[0].size());
  size_t hold = 0;
  for (const auto& s : r.stop) hold = std::max(hold, s.size() - 1);
  struct Stream {
    explicit Stream(const Tokenizer& t) : st(t) {}
    TextState st;
    size_t sent = 0;       // bytes of st.text sent
    bool begun = false;    // chat: the role chunk sent
    bool echoed = false;   // echo: the prompt sent
    size_t lp_sent = 0;    // generated tokens whose logprobs are sent
    size_t lp_text = 0;    // bytes of their texts (where the next one's begins in st.text)
    size_t lp_offset = 0;  // completions: where the next entry's text begins in the choice's
  };
  auto ss = std::make_shared<Stream>(tok);
  const std::string echo_text = r.echo ? echoed[0] : std::string();
  const int32_t first_token = prompts[0][0];
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, job, ss, hold, r, id, created, reason, score_only, P0, echo_text, first_token](
          size_t, httplib::DataSink& sink) {
        const auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
        const bool lp = r.logprobs >= 0;
        const auto lp_json = [&](const std::vector<LogprobEntry>& e, size_t offset) {
          return r.chat ? ChatLogprobs(e) : CompletionLogprobs(e, offset);
        };
        if (!ss->begun && r.chat && !write(StreamRoleChunk(r, id, created))) return false;
        ss->begun = true;
        const bool done = Advance(*job, ss->st, r);
        if (done && job->error_status != 0) {
          write("data: " + ErrorBody(ApiError(job->error_status, job->error, "", "server_error")) +
                "\n\n");
          sink.done();
          return true;
        }
        if (r.echo && !ss->echoed) {
          std::vector<LogprobEntry> e;
          if (lp) {
            std::lock_guard<std::mutex> lk(job->m);
            if (job->tokens.empty() && !job->finished) return sink.is_writable();  // not yet
            e = PromptEntries(first_token, job->prompt_lps);
          }
          const nlohmann::json j = lp_json(e, 0);
          if (!write(StreamChunk(r, id, created, echo_text, "", nullptr, lp ? &j : nullptr)))
            return false;
          for (const LogprobEntry& x : e) ss->lp_offset += x.text.size();
          ss->echoed = true;
        }
        TextState& st = ss->st;
        size_t upto = score_only ? 0
                      : done     ? st.text.size()
                                 : (st.text.size() > hold ? st.text.size() - hold : 0);
        // (Never inside a character: a chunk's text is whole UTF-8.)
        while (upto > ss->sent && upto < st.text.size() &&
               (static_cast<unsigned char>(st.text[upto]) & 0xC0) == 0x80)
          --upto;
        // The generated tokens' entries that go with the text up to `upto`.
        std::vector<LogprobEntry> e;
        if (lp && !score_only) {
          std::lock_guard<std::mutex> lk(job->m);
          const size_t have = std::min(st.used, job->lps.size());
          for (; ss->lp_sent < have; ++ss->lp_sent) {
            const bool in = ss->lp_text < upto || (done && !st.stopped);
            if (!in) break;
            e.push_back(Entry(job->lps[ss->lp_sent]));
            ss->lp_text += e.back().text.size();
          }
        }
        if (upto > ss->sent || !e.empty()) {
          const nlohmann::json j = lp_json(e, ss->lp_offset);
          const std::string piece =
              upto > ss->sent ? st.text.substr(ss->sent, upto - ss->sent) : "";
          if (!write(StreamChunk(r, id, created, piece, "", nullptr, lp ? &j : nullptr)))
            return false;
          ss->sent = std::max(ss->sent, upto);
          for (const LogprobEntry& x : e) ss->lp_offset += x.text.size();
        }
        if (!done) return sink.is_writable();
        if (st.stopped) Cancel(job);
        const Usage u{P0, score_only ? 0 : static_cast<int64_t>(st.used)};
        write(StreamChunk(r, id, created, "", score_only ? "length" : reason(*job, st),
                          r.include_usage ? &u : nullptr));
        write("data: [DONE]\n\n");
        sink.done();
        return true;
      },
      [this, job](bool success) {
        if (success) return;
        std::lock_guard<std::mutex> lk(job->m);
        if (!job->finished) {  // the client went away: its sequence is dropped
          std::lock_guard<std::mutex> lk2(m);
          cancels.push_back(job);
          cv.notify_one();
        }
      });
}

void Server::Impl::Routes() {
  http.set_payload_max_length(so.max_body);
  http.new_task_queue = [n = std::max<int64_t>(8, 2 * eo.max_batch + 4)] {
    return new httplib::ThreadPool(static_cast<size_t>(n));
  };
  http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (so.api_key.empty() || req.path == "/health")
      return httplib::Server::HandlerResponse::Unhandled;
    if (req.get_header_value("Authorization") == "Bearer " + so.api_key)
      return httplib::Server::HandlerResponse::Unhandled;
    res.status = 401;
    res.set_content(ErrorBody(ApiError(401,
                                       "a valid API key is required (Authorization: Bearer "
                                       "KEY)",
                                       "", "authentication_error")),
                    "application/json");
    return httplib::Server::HandlerResponse::Handled;
  });
  http.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    const std::string what = res.status == 404 ? "no such endpoint: " + req.method + " " + req.path
                             : res.status == 413 ? "the request body is larger than " +
                                                       std::to_string(so.max_body) + " bytes"
                                                 : "the request failed";
    res.set_content(ErrorBody(ApiError(res.status, what, "", "invalid_request_error")),
                    "application/json");
  });
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    nlohmann::json j = {{"status", "ok"},
                        {"model", so.model_name},
                        {"waiting", waiting.load()},
                        {"running", running.load()},
                        {"cached_prompts", cached.load()},
                        {"reused_prompt_tokens", reused.load()}};
    res.set_content(Dump(j), "application/json");
  });
  http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    nlohmann::json m = {
        {"id", so.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "needle"}};
    res.set_content(Dump(nlohmann::json{{"object", "list"}, {"data", {m}}}), "application/json");
  });
  http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Complete(req, res, false);
  });
  http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Complete(req, res, true);
  });
}

Server::Server(Model& model, const Tokenizer& tok, const EngineOptions& engine,
               const ServerOptions& opt, PolicyFactory policy)
    : impl_(std::make_unique<Impl>(model, tok, engine, opt, std::move(policy))) {
  impl_->Routes();
}

Server::~Server() { Stop(); }

int Server::Start() {
  Impl& x = *impl_;
  const int port = x.so.port == 0 ? x.http.bind_to_any_port(x.so.host)
                                  : (x.http.bind_to_port(x.so.host, x.so.port) ? x.so.port : -1);
  if (port <= 0) Fail("needle serve: cannot listen on ", x.so.host, ":", x.so.port);
  x.engine_thread = std::thread([&x] { x.EngineLoop(); });
  x.http_thread = std::thread([&x] { x.http.listen_after_bind(); });
  return port;
}

void Server::Wait() {
  if (impl_->http_thread.joinable()) impl_->http_thread.join();
}

void Server::Stop() {
  Impl& x = *impl_;
  x.http.stop();
  {
    std::lock_guard<std::mutex> lk(x.m);
    x.stopping = true;
    x.cv.notify_all();
  }
  if (x.http_thread.joinable()) x.http_thread.join();
  if (x.engine_thread.joinable()) x.engine_thread.join();
}

}  // namespace needle::server
