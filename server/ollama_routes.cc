// needle serve's Ollama API (server/ollama.h): the routes, each request a sequence of the same
// Engine as OpenAI's requests (server.cc), so both APIs' clients are batched together.
#include <algorithm>
#include <chrono>

#include "server/ollama.h"
#include "server/request_fields.h"
#include "server/server_impl.h"

namespace needle::server {

namespace {

// The version of Ollama's API that needle's follows (GET /api/version; clients compare it).
constexpr const char* kOllamaApiVersion = "0.9.0";

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

void Server::Impl::Ollama(const httplib::Request& req, httplib::Response& res, bool chat) {
  const auto refuse = [&](const ApiError& e) {
    res.status = e.status;
    res.set_content(OllamaErrorBody(e), "application/json");
  };
  const std::string created = OllamaTime(std::chrono::system_clock::now());
  OllamaRequest q;
  std::vector<int32_t> prompt;
  int64_t max_new = 0;
  try {
    q = ParseOllama(req.body, chat, so.model_name);
    if (!q.load_only) {
      if (chat) {
        prompt = ChatTokens(q.r.messages);
      } else {
        CheckIds(q.context, "context");
        prompt = q.context;
        std::vector<int32_t> more;
        const std::string& text = q.r.prompts[0].text;
        if (q.raw || so.chat == ChatFamily::kNone) {
          // (As needle generate -p: the model's BOS first, unless this continues a context.)
          more = tok.Encode(q.system.empty() ? text : q.system + "\n" + text, q.context.empty());
        } else {
          std::vector<ChatMessage> msgs;
          if (!q.system.empty()) msgs.push_back({"system", q.system});
          msgs.push_back({"user", text});
          more = ChatTokens(msgs);
        }
        prompt.insert(prompt.end(), more.begin(), more.end());
      }
      const bool own = q.num_ctx > 0 && q.num_ctx < eo.max_context;
      max_new = Budget(prompt, q.r, true, own ? q.num_ctx : eo.max_context,
                       own ? "options.num_ctx" : "the server's --ctx-size");
    }
  } catch (const ApiError& e) {
    refuse(e);
    return;
  }
  const char* type = q.r.stream ? "application/x-ndjson" : "application/json";
  const std::string end = q.r.stream ? "\n" : "";
  if (q.load_only) {  // Ollama's "load the model": it is loaded
    OllamaDone d;
    d.reason = "load";
    res.set_content(Dump(OllamaObject(q, created, "", &d)) + end, type);
    return;
  }
  const auto job = NewJob(prompt, max_new, q.r);
  Submit(job);
  // The last object's counts: the prompt, the tokens whose text was used, the durations.
  const auto done = [this, job, q, prompt](const TextState& st) {
    OllamaDone d;
    d.reason = Reason(*job, st);
    std::lock_guard<std::mutex> lk(job->m);
    d.prompt_tokens = static_cast<int64_t>(prompt.size());
    d.eval_tokens = static_cast<int64_t>(st.used);
    const auto now = std::chrono::steady_clock::now();
    d.total_seconds = Seconds(now - job->made);
    d.prompt_seconds = Seconds(job->first - job->made);
    d.eval_seconds = Seconds(job->last - job->first);
    return d;
  };
  const auto context = [job, prompt](const TextState& st) {
    std::vector<int32_t> c = prompt;
    std::lock_guard<std::mutex> lk(job->m);
    c.insert(c.end(), job->tokens.begin(),
             job->tokens.begin() + static_cast<long>(std::min(st.used, job->tokens.size())));
    return c;
  };
  if (!q.r.stream) {
    auto w = std::make_shared<Whole>(std::vector<std::shared_ptr<Job>>{job}, q.r, tok);
    RespondWhole(res, w, [q, done, context](Whole& w, int* status) {
      const Job& j = *w.jobs[0];
      if (j.error_status != 0) {
        *status = j.error_status;
        return OllamaErrorBody(ApiError(j.error_status, j.error, "", "server_error"));
      }
      OllamaDone d = done(w.st[0]);
      const std::vector<int32_t> c = q.r.chat ? std::vector<int32_t>() : context(w.st[0]);
      if (!q.r.chat) d.context = &c;
      const std::string now = OllamaTime(std::chrono::system_clock::now());
      return Dump(OllamaObject(q, now, w.st[0].text, &d));
    });
    return;
  }
  // Streamed: a line of JSON per piece of text (held back while it could begin a stop string),
  // then the last object with the counts.
  struct Stream {
    explicit Stream(const Tokenizer& t) : st(t) {}
    TextState st;
    size_t sent = 0;  // bytes of st.text sent
  };
  auto ss = std::make_shared<Stream>(tok);
  const size_t hold = Hold(q.r.stop);
  res.set_chunked_content_provider(
      type,
      [this, job, ss, q, hold, done, context](size_t, httplib::DataSink& sink) {
        const auto line = [&](const nlohmann::json& j) {
          const std::string s = Dump(j) + "\n";
          return sink.write(s.data(), s.size());
        };
        const bool finished = Advance(*job, ss->st, q.r);
        if (finished && job->error_status != 0) {
          const std::string e =
              OllamaErrorBody(ApiError(job->error_status, job->error, "", "server_error")) + "\n";
          sink.write(e.data(), e.size());
          sink.done();
          return true;
        }
        const TextState& st = ss->st;
        const size_t upto = Sendable(st, ss->sent, hold, finished);
        const std::string now = OllamaTime(std::chrono::system_clock::now());
        if (upto > ss->sent) {
          if (!line(OllamaObject(q, now, st.text.substr(ss->sent, upto - ss->sent), nullptr)))
            return false;
          ss->sent = upto;
        }
        if (!finished) return sink.is_writable();
        if (st.stopped) Cancel(job);
        OllamaDone d = done(st);
        const std::vector<int32_t> c = q.r.chat ? std::vector<int32_t>() : context(st);
        if (!q.r.chat) d.context = &c;
        line(OllamaObject(q, now, "", &d));
        sink.done();
        return true;
      },
      [this, job](bool success) {
        if (!success) Abandon(job);
      });
}

void Server::Impl::OllamaRoutes() {
  http.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("needle is running (OpenAI's API under /v1/, Ollama's under /api/)",
                    "text/plain");
  });
  http.Get("/api/version", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(Dump(nlohmann::json{{"version", kOllamaApiVersion}}), "application/json");
  });
  http.Get("/api/tags", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(Dump(nlohmann::json{{"models", {OllamaModelEntry(served)}}}),
                    "application/json");
  });
  http.Get("/api/ps", [this](const httplib::Request&, httplib::Response& res) {
    nlohmann::json m = OllamaModelEntry(served);
    m.erase("modified_at");
    m["expires_at"] = "0001-01-01T00:00:00Z";  // (loaded while the server runs)
    m["size_vram"] = model.backend().kv_memory() != nullptr ? served.size_bytes : 0;
    res.set_content(Dump(nlohmann::json{{"models", {m}}}), "application/json");
  });
  http.Post("/api/show", [this](const httplib::Request& req, httplib::Response& res) {
    try {
      const nlohmann::json j = fields::ParseBody(req.body);
      // ("name" is the field's older spelling.)
      std::string name = fields::String(j, "model");
      if (name.empty()) name = fields::String(j, "name");
      if (name.empty()) throw ApiError(400, "'model' is required", "model");
      if (!SameOllamaModel(name, so.model_name))
        throw ApiError(404, "model '" + name + "' not found (serving '" + so.model_name + "')",
                       "model");
      res.set_content(Dump(OllamaShow(served)), "application/json");
    } catch (const ApiError& e) {
      res.status = e.status;
      res.set_content(OllamaErrorBody(e), "application/json");
    }
  });
  http.Post("/api/generate", [this](const httplib::Request& req, httplib::Response& res) {
    Ollama(req, res, false);
  });
  http.Post("/api/chat", [this](const httplib::Request& req, httplib::Response& res) {
    Ollama(req, res, true);
  });
}

}  // namespace needle::server
