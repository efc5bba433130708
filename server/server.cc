#include "server/server.h"

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
#include "server/server_impl.h"

namespace needle::server {

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

std::vector<int32_t> Server::Impl::ChatTokens(const std::vector<ChatMessage>& messages) const {
  std::string text;
  if (so.chat == ChatFamily::kNone) {
    for (const auto& msg : messages) text += (text.empty() ? "" : "\n") + msg.content;
  } else {
    try {
      text = FormatChat(so.chat, messages, so.bos, so.eos);
    } catch (const Error& e) {
      throw ApiError(400, e.what(), "messages");
    }
  }
  return tok.Encode(text, false);
}

void Server::Impl::CheckIds(const std::vector<int32_t>& ids, const std::string& param) const {
  for (int32_t id : ids)
    if (id >= model.config().vocab_size)
      throw ApiError(400,
                     "'" + param + "' holds token id " + std::to_string(id) +
                         ", outside the vocabulary of " + std::to_string(model.config().vocab_size),
                     param);
}

int64_t Server::Impl::Budget(const std::vector<int32_t>& prompt, const CompletionRequest& r,
                             bool to_context, int64_t C, const std::string& limit) {
  const std::string param = r.chat ? "messages" : "prompt";
  const int64_t P = static_cast<int64_t>(prompt.size());
  if (P == 0) throw ApiError(400, "the prompt has no tokens", param);
  if (P >= C)
    throw ApiError(400,
                   "the prompt has " + std::to_string(P) + " tokens; the context holds " +
                       std::to_string(C) + " (" + limit + "), answer included",
                   param);
  const int64_t n = r.max_tokens >= 0 ? r.max_tokens
                    : to_context      ? C - P
                                      : std::min<int64_t>(16, C - P);
  if (P + std::max<int64_t>(n, 1) > C)
    throw ApiError(400,
                   "the prompt's " + std::to_string(P) + " tokens and " + r.max_tokens_field + " " +
                       std::to_string(n) + " exceed the context of " + std::to_string(C) +
                       " tokens (" + limit + ")",
                   r.max_tokens_field);
  return std::max<int64_t>(n, 1);
}

std::shared_ptr<Job> Server::Impl::NewJob(const std::vector<int32_t>& prompt, int64_t max_new,
                                          const CompletionRequest& r) const {
  auto job = std::make_shared<Job>();
  job->req.prompt = prompt;
  job->req.max_new = max_new;
  job->req.sampling = r.sampling;
  job->req.logprobs = r.logprobs;
  job->req.ignore_eos = r.ignore_eos;
  job->req.prompt_logprobs = job->want_prompt_lps = r.echo && r.logprobs >= 0;
  if (policy) job->req.policy = policy(static_cast<int64_t>(prompt.size()) + max_new);
  return job;
}

const char* Server::Impl::Reason(Job& j, const TextState& st) {
  std::lock_guard<std::mutex> lk(j.m);
  return st.stopped || j.st.stopped_at_eos ? "stop" : "length";
}

size_t Server::Impl::Hold(const std::vector<std::string>& stop) {
  size_t hold = 0;
  for (const auto& s : stop) hold = std::max(hold, s.size() - 1);
  return hold;
}

size_t Server::Impl::Sendable(const TextState& st, size_t sent, size_t hold, bool done) {
  size_t upto = done ? st.text.size() : (st.text.size() > hold ? st.text.size() - hold : 0);
  // (Never inside a character: a chunk's text is whole UTF-8.)
  while (upto > sent && upto < st.text.size() &&
         (static_cast<unsigned char>(st.text[upto]) & 0xC0) == 0x80)
    --upto;
  return std::max(upto, sent);
}

void Server::Impl::Abandon(const std::shared_ptr<Job>& job) {
  {
    std::lock_guard<std::mutex> lk(job->m);
    if (job->finished) return;
  }
  // (Not under job->m: the engine thread takes m, then a job's lock, when it stops. A job that
  // finishes meanwhile is not in the engine's live set any more, and its cancel is dropped.)
  std::lock_guard<std::mutex> lk(m);  // the client went away: its sequence is dropped
  cancels.push_back(job);
  ++abandoned;
  cv.notify_one();
}

bool Server::Impl::Poll(Whole& w, std::chrono::steady_clock::time_point until) {
  while (w.done < w.jobs.size()) {
    Job& job = *w.jobs[w.done];
    if (!Advance(job, w.st[w.done], w.r)) {
      if (std::chrono::steady_clock::now() >= until) return false;
      continue;
    }
    if (w.st[w.done].stopped) Cancel(w.jobs[w.done]);
    if (job.error_status != 0) {  // (the response is the error: the others are not waited for)
      for (size_t k = w.done + 1; k < w.jobs.size(); ++k) Cancel(w.jobs[k]);
      w.done = w.jobs.size();
      break;
    }
    ++w.done;
  }
  return true;
}

void Server::Impl::RespondWhole(httplib::Response& res, const std::shared_ptr<Whole>& w,
                                const WholeBody& body) {
  const auto now = [] { return std::chrono::steady_clock::now(); };
  if (Poll(*w, now() + so.whole_grace)) {
    int status = 200;
    const std::string b = body(*w, &status);
    res.status = status;
    res.set_content(b, "application/json");
    return;
  }
  // Longer: the status is sent now (200), then a space every so.keepalive (JSON may begin with
  // white space). Once the client has gone a write fails, and its sequences are cancelled.
  res.set_chunked_content_provider(
      "application/json",
      [this, w, body, now](size_t, httplib::DataSink& sink) {
        if (!Poll(*w, now() + so.keepalive)) return sink.write(" ", 1) && sink.is_writable();
        int status = 200;  // (an error now: its body, under the 200 already sent)
        const std::string b = body(*w, &status);
        sink.write(b.data(), b.size());
        sink.done();
        return true;
      },
      [this, w](bool success) {
        if (!success)
          for (const auto& j : w->jobs) Abandon(j);
      });
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
        engine.reset();  // (its pool or slots freed before the new one takes theirs)
        engine = std::make_unique<Engine>(model, eo);
      }
      for (const TokenEvent& ev : events) {
        auto it = live.find(ev.seq);
        if (it == live.end()) continue;
        Job& j = *it->second;
        std::lock_guard<std::mutex> lk(j.m);
        if (j.tokens.empty() && j.seq >= 0 && j.want_prompt_lps)
          j.prompt_lps = engine->PromptLogprobs(ev.seq);
        j.last = std::chrono::steady_clock::now();
        if (j.tokens.empty()) j.first = j.last;
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
    preempted = engine->Preempted();
    preemptions = engine->preemptions();
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
    if (chat) prompts.push_back(ChatTokens(r.messages));
    for (const PromptInput& in : r.prompts) {
      if (!in.ids.empty()) {
        CheckIds(in.ids, "prompt");
        prompts.push_back(in.ids);
      } else {
        prompts.push_back(tok.Encode(in.text, true));  // (as needle generate -p: the model's BOS)
      }
      if (r.echo) echoed.push_back(in.ids.empty() ? in.text : tok.Decode(in.ids));
    }
    for (const auto& prompt : prompts)
      max_new.push_back(Budget(prompt, r, chat, eo.max_context, "--ctx-size"));
  } catch (const ApiError& e) {
    refuse(e);
    return;
  }
  // max_tokens 0 (echo): the prompt is scored and the token generated after it dropped.
  const bool score_only = r.max_tokens == 0;
  std::vector<std::shared_ptr<Job>> jobs;
  for (size_t i = 0; i < prompts.size(); ++i) jobs.push_back(NewJob(prompts[i], max_new[i], r));
  const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(ids++);
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  for (const auto& job : jobs) Submit(job);
  if (!r.stream) {
    auto w = std::make_shared<Whole>(jobs, r, tok);
    RespondWhole(res, w, [this, prompts, echoed, score_only, id, created](Whole& w, int* status) {
      const CompletionRequest& r = w.r;
      std::vector<Choice> choices;
      Usage u;
      for (size_t i = 0; i < w.jobs.size(); ++i) {
        Job& job = *w.jobs[i];
        const TextState& st = w.st[i];
        if (job.error_status != 0) {
          *status = job.error_status;
          return ErrorBody(ApiError(job.error_status, job.error, "", "server_error"));
        }
        Choice c;
        c.finish = score_only ? "length" : Reason(job, st);
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
      return Dump(CompletionBody(r, id, created, choices, u));
    });
    return;
  }
  // Streamed: text is sent as it is decoded, but the last bytes that could begin a stop string
  // are held back until they cannot. echo: the prompt's text first (with its logprobs, once the
  // first token brings them); logprobs: each chunk carries the entries of the tokens whose text
  // begins in it (those left at the end go with the last piece, cut by a stop string as the
  // whole response's are).
  const auto job = jobs[0];
  const int64_t P0 = static_cast<int64_t>(prompts[0].size());
  const size_t hold = Hold(r.stop);
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
      [this, job, ss, hold, r, id, created, score_only, P0, echo_text, first_token](
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
        const size_t upto = score_only ? 0 : Sendable(st, ss->sent, hold, done);
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
        write(StreamChunk(r, id, created, "", score_only ? "length" : Reason(*job, st),
                          r.include_usage ? &u : nullptr));
        write("data: [DONE]\n\n");
        sink.done();
        return true;
      },
      [this, job](bool success) {
        if (!success) Abandon(job);
      });
}

void Server::Impl::SetError(const httplib::Request& req, httplib::Response& res,
                            const ApiError& e) {
  const bool ollama = req.path == "/" || req.path.rfind("/api/", 0) == 0;
  res.set_content(ollama ? OllamaErrorBody(e) : ErrorBody(e), "application/json");
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
    SetError(req, res,
             ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "",
                      "authentication_error"));
    return httplib::Server::HandlerResponse::Handled;
  });
  http.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    const std::string what = res.status == 404 ? "no such endpoint: " + req.method + " " + req.path
                             : res.status == 413 ? "the request body is larger than " +
                                                       std::to_string(so.max_body) + " bytes"
                                                 : "the request failed";
    SetError(req, res, ApiError(res.status, what, "", "invalid_request_error"));
  });
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    nlohmann::json j = {{"status", "ok"},
                        {"model", so.model_name},
                        {"waiting", waiting.load()},
                        {"running", running.load()},
                        {"preempted", preempted.load()},
                        {"preemptions", preemptions.load()},
                        {"cached_prompts", cached.load()},
                        {"reused_prompt_tokens", reused.load()},
                        {"abandoned_sequences", abandoned.load()}};
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
  OllamaRoutes();
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
