// needle serve (server/): the request checks of OpenAI's APIs field by field, and a server on a
// free local port answering over HTTP what the model answers alone (greedy), whole and streamed,
// several clients at once, with the refusals a client must get (401, 404, 413, 400).
#include <gtest/gtest.h>
#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/backend/backend.h"
#include "engine/model/logprobs.h"
#include "engine/model/model.h"
#include "engine/tokenizer/tokenizer.h"
#include "server/openai.h"
#include "server/server.h"
#include "tests/cli_test_util.h"
#include "tests/fixture_util.h"
#include "tests/server_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

using nlohmann::json;
using server::ApiError;
using server::ParseCompletion;

// The status and param of the ApiError that parsing `body` throws (0, "" when none).
std::pair<int, std::string> Refusal(const std::string& body, bool chat = false) {
  return RefusalOf([&] { ParseCompletion(body, chat, "m"); });
}

TEST(ServerApi, ParsesRequestsAndRefusesFieldByField) {
  const auto r = ParseCompletion(
      R"({"model":"m","prompt":"hi","max_tokens":7,"temperature":0.5,"top_p":0.9,"seed":3,)"
      R"("stop":["a","bc"],"stream":true,"stream_options":{"include_usage":true},"n":1,)"
      R"("logprobs":false,"echo":false,"presence_penalty":0})",
      false, "m");
  ASSERT_EQ(r.prompts.size(), 1u);
  EXPECT_EQ(r.prompts[0].text, "hi");
  EXPECT_EQ(r.logprobs, -1);
  EXPECT_EQ(r.max_tokens, 7);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_EQ(r.sampling.seed, 3u);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"a", "bc"}));
  EXPECT_TRUE(r.stream && r.include_usage);
  EXPECT_EQ(ParseCompletion(R"({"model":"m","prompt":[5,6,7]})", false, "m").prompts.at(0).ids,
            (std::vector<int32_t>{5, 6, 7}));
  // Several prompts (lm-evaluation-harness sends token-id arrays), logprobs, echo, max_tokens 0.
  const auto m = ParseCompletion(
      R"({"model":"m","prompt":[[1,2],"ab",[3]],"logprobs":2,"echo":true,"max_tokens":0})", false,
      "m");
  ASSERT_EQ(m.prompts.size(), 3u);
  EXPECT_EQ(m.prompts[0].ids, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(m.prompts[1].text, "ab");
  EXPECT_EQ(m.prompts[2].ids, (std::vector<int32_t>{3}));
  EXPECT_EQ(m.logprobs, 2);
  EXPECT_TRUE(m.echo);
  EXPECT_EQ(m.max_tokens, 0);
  EXPECT_EQ(ParseCompletion(R"({"model":"m","messages":[{"role":"user","content":"u"}],)"
                            R"("logprobs":true,"top_logprobs":4})",
                            true, "m")
                .logprobs,
            4);
  const auto c = ParseCompletion(
      R"({"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}],)"
      R"("max_completion_tokens":3})",
      true, "m");
  ASSERT_EQ(c.messages.size(), 2u);
  EXPECT_EQ(c.messages[1].content, "u");
  EXPECT_EQ(c.max_tokens, 3);
  using P = std::pair<int, std::string>;
  EXPECT_EQ(Refusal("{bad"), P(400, ""));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":[1e381,2]})"), P(400, ""));  // (fuzz_openai found it)
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","x":)" + std::string(100000, '[') +
                    std::string(100000, ']') + "}"),
            P(400, ""));  // nested 100,000 deep: refused by the parser
  EXPECT_EQ(Refusal("[1]"), P(400, ""));
  EXPECT_EQ(Refusal(R"({"prompt":"a"})"), P(400, "model"));
  EXPECT_EQ(Refusal(R"({"model":"other","prompt":"a"})"), P(404, "model"));
  EXPECT_EQ(Refusal(R"({"model":"m"})"), P(400, "prompt"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":""})"), P(400, "prompt"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":{"a":1}})"), P(400, "prompt"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":[1,-2]})"), P(400, "prompt"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","max_tokens":"5"})"), P(400, "max_tokens"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","max_tokens":0})"), P(400, "max_tokens"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","temperature":3})"), P(400, "temperature"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","stop":["1","2","3","4","5"]})"), P(400, "stop"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","stop":[""]})"), P(400, "stop"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","stream":"yes"})"), P(400, "stream"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","n":2})"), P(400, "n"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","logprobs":21})"), P(400, "logprobs"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","logprobs":true})"), P(400, "logprobs"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","echo":1})"), P(400, "echo"));
  // (Streaming takes logprobs and echo.)
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","logprobs":1,"echo":true,"stream":true})"),
            P(0, ""));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":["a","b"],"stream":true})"), P(400, "stream"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":[[1],""]})"), P(400, "prompt"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":[[1],{}]})"), P(400, "prompt"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":[[1,-1]]})"), P(400, "prompt"));
  std::string many;  // 257 prompts: one more than a request takes
  for (int i = 0; i < 257; ++i) many += (i ? ",[1]" : "[1]");
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":[)" + many + "]}"), P(400, "prompt"));
  EXPECT_EQ(
      Refusal(R"({"model":"m","messages":[{"role":"user","content":"u"}],"top_logprobs":2})", true),
      P(400, "top_logprobs"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":[{"role":"user","content":"u"}],)"
                    R"("logprobs":true,"top_logprobs":30})",
                    true),
            P(400, "top_logprobs"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","presence_penalty":0.5})"),
            P(400, "presence_penalty"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":[]})", true), P(400, "messages"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":"hi"})", true), P(400, "messages"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":[{"role":"bot","content":"x"}]})", true),
            P(400, "messages[0].role"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":[{"role":"user","content":3}]})", true),
            P(400, "messages[0].content"));
  const json err = json::parse(server::ErrorBody(ApiError(400, "bad x", "x")));
  EXPECT_EQ(err["error"]["message"], "bad x");
  EXPECT_EQ(err["error"]["param"], "x");
  EXPECT_EQ(server::StopAt("abcdef", {"de", "c"}), 2u);
  EXPECT_EQ(server::StopAt("abc", {"x"}), std::string::npos);
}

// Log-likelihood as lm-evaluation-harness asks for it (local-completions): token-id prompts in
// one request, echo, logprobs 1, max_tokens 1. Each choice (index i for prompt i) lists the
// prompt's tokens then the generated one; the first has no logprob; every other is log_softmax
// of the model's logits alone before it, and its top dict holds the most likely token (the
// harness's greedy check). max_tokens 0 returns the prompt alone; chat reports its generated
// tokens' logprobs.
TEST(Server, ScoresPromptsAsLogLikelihoodHarnessesAsk) {
  Served s;
  httplib::Client cli("127.0.0.1", s.port);
  const int64_t V = s.model->config().vocab_size;
  // A token's text as the response holds it (a byte that is no UTF-8 alone becomes U+FFFD).
  const auto text = [&](int32_t t) {
    return json::parse(server::Dump(json(s.tok->Decode({t})))).get<std::string>();
  };
  const std::vector<std::vector<int32_t>> ps = {Ids(1, 20), Ids(2, 9)};
  json req = {{"model", "m"}, {"prompt", ps},  {"max_tokens", 1},
              {"echo", true}, {"logprobs", 1}, {"temperature", 0}};
  auto r = cli.Post("/v1/completions", req.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  ASSERT_EQ(j["choices"].size(), 2u);
  for (size_t i = 0; i < ps.size(); ++i) {
    const json& c = j["choices"][i];
    EXPECT_EQ(c["index"], i);
    const std::vector<int32_t>& p = ps[i];
    const int64_t P = static_cast<int64_t>(p.size());
    std::vector<float> all;  // the model alone: every position's logits
    KVCache cache(s.model->CacheShape(Served::kCtx, DType::kF32, 16));
    s.model->Forward(p.data(), P, cache, true, &all);
    const int32_t next =
        static_cast<int32_t>(std::max_element(all.end() - V, all.end()) - (all.end() - V));
    const json& lp = c["logprobs"];
    ASSERT_EQ(lp["tokens"].size(), static_cast<size_t>(P + 1));
    EXPECT_TRUE(lp["token_logprobs"][0].is_null());
    EXPECT_TRUE(lp["top_logprobs"][0].is_null());
    EXPECT_EQ(lp["text_offset"][0], 0);
    for (int64_t k = 1; k <= P; ++k) {
      const int32_t t = k < P ? p[k] : next;
      const TokenLogprob want = ScoreToken(all.data() + (k - 1) * V, V, t, 1);
      EXPECT_FLOAT_EQ(lp["token_logprobs"][k].get<float>(), want.logprob) << i << " " << k;
      EXPECT_EQ(lp["tokens"][k], text(t));
      const json& top = lp["top_logprobs"][k];
      ASSERT_TRUE(top.contains(text(want.top[0].first))) << top.dump();
      EXPECT_FLOAT_EQ(top[text(want.top[0].first)].get<float>(), want.top[0].second);
      EXPECT_LE(top.size(), 2u);  // the most likely and the chosen
    }
    // The generated token is the greedy one: its logprob is the largest of its top dict.
    float best = -1e30f;
    for (const auto& [key, v] : lp["top_logprobs"][P].items())
      best = std::max(best, v.get<float>());
    EXPECT_EQ(lp["token_logprobs"][P].get<float>(), best);
    EXPECT_EQ(c["text"], json::parse(server::Dump(json(s.tok->Decode(p) + s.tok->Decode({next})))));
  }
  EXPECT_EQ(j["usage"]["prompt_tokens"], 29);
  EXPECT_EQ(j["usage"]["completion_tokens"], 2);
  // max_tokens 0: the prompt scored, nothing generated.
  req["max_tokens"] = 0;
  req["prompt"] = ps[1];
  r = cli.Post("/v1/completions", req.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json z = json::parse(r->body);
  EXPECT_EQ(z["choices"][0]["text"], s.tok->Decode(ps[1]));
  EXPECT_EQ(z["choices"][0]["logprobs"]["tokens"].size(), ps[1].size());
  EXPECT_EQ(z["usage"]["completion_tokens"], 0);
  // Logprobs without echo: the generated tokens only; chat: its content list.
  r = cli.Post("/v1/completions",
               json{{"model", "m"}, {"prompt", ps[0]}, {"max_tokens", 5}, {"logprobs", 0}}.dump(),
               "application/json");
  ASSERT_TRUE(r);
  const json g = json::parse(r->body);
  EXPECT_EQ(g["choices"][0]["logprobs"]["tokens"].size(), 5u);
  EXPECT_EQ(g["choices"][0]["text"], s.Alone(ps[0], 5));
  json chat = {{"model", "m"},
               {"messages", {{{"role", "user"}, {"content", "abc"}}}},
               {"max_tokens", 4},
               {"logprobs", true},
               {"top_logprobs", 3}};
  r = cli.Post("/v1/chat/completions", chat.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json cl = json::parse(r->body)["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(cl.size(), 4u);
  EXPECT_EQ(cl[0]["top_logprobs"].size(), 3u);
  EXPECT_LE(cl[0]["logprob"].get<float>(), 0.f);
  // (bytes: the token's own bytes, where its text may hold U+FFFD for a partial character)
  EXPECT_FALSE(cl[0]["bytes"].empty());
}

// The events of a streamed response, [DONE] excluded (done: whether it came).
std::vector<json> Events(const std::string& body, bool* done) {
  std::vector<json> out;
  *done = false;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    const std::string data = body.substr(at + 6, end - at - 6);
    at = end;
    if (data == "[DONE]") {
      *done = true;
      break;
    }
    out.push_back(json::parse(data));
  }
  return out;
}

// Streamed with logprobs and echo, a response's chunks add up to the whole response: the same
// text, the same tokens, logprobs, top logprobs and text offsets, in order (completions); the
// same content list (chat); the prompt alone with max_tokens 0; a stop string cutting both alike.
TEST(Server, StreamsLogprobsAndEchoAsTheWholeResponse) {
  Served s;
  httplib::Client cli("127.0.0.1", s.port);
  const std::vector<int32_t> p = Ids(3, 24);
  const auto whole_and_streamed = [&](json req, const char* path, json* whole, json* streamed,
                                      std::string* finish, int64_t* completion) {
    auto w = cli.Post(path, req.dump(), "application/json");
    ASSERT_TRUE(w);
    ASSERT_EQ(w->status, 200) << w->body;
    *whole = json::parse(w->body)["choices"][0];
    req["stream"] = true;
    req["stream_options"] = {{"include_usage", true}};
    auto r = cli.Post(path, req.dump(), "application/json");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    bool done = false;
    const std::vector<json> ev = Events(r->body, &done);
    EXPECT_TRUE(done);
    const bool chat = std::string(path).find("chat") != std::string::npos;
    *streamed = chat ? json{{"content", ""}, {"logprobs", json::array()}}
                     : json{{"text", ""},
                            {"tokens", json::array()},
                            {"token_logprobs", json::array()},
                            {"top_logprobs", json::array()},
                            {"text_offset", json::array()}};
    for (const json& e : ev) {
      if (e.contains("usage")) *completion = e["usage"]["completion_tokens"];
      if (e["choices"].empty()) continue;
      const json& c = e["choices"][0];
      if (!c["finish_reason"].is_null()) *finish = c["finish_reason"];
      if (chat) {
        if (c["delta"].contains("content"))
          (*streamed)["content"] =
              (*streamed)["content"].get<std::string>() + c["delta"]["content"].get<std::string>();
        if (c.contains("logprobs") && !c["logprobs"].is_null())
          for (const json& x : c["logprobs"]["content"]) (*streamed)["logprobs"].push_back(x);
        continue;
      }
      (*streamed)["text"] = (*streamed)["text"].get<std::string>() + c["text"].get<std::string>();
      if (c["logprobs"].is_null()) continue;
      for (const char* k : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
        for (const json& x : c["logprobs"][k]) (*streamed)[k].push_back(x);
    }
  };
  json whole, streamed;
  std::string finish;
  int64_t completion = -1;
  // Echo and logprobs, 6 tokens.
  json req = {{"model", "m"}, {"prompt", p},   {"max_tokens", 6},
              {"echo", true}, {"logprobs", 2}, {"temperature", 0}};
  whole_and_streamed(req, "/v1/completions", &whole, &streamed, &finish, &completion);
  EXPECT_EQ(streamed["text"], whole["text"]);
  for (const char* k : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
    EXPECT_EQ(streamed[k], whole["logprobs"][k]) << k;
  EXPECT_EQ(whole["logprobs"]["tokens"].size(), p.size() + 6);
  EXPECT_EQ(finish, whole["finish_reason"]);
  EXPECT_EQ(completion, 6);
  // max_tokens 0: the prompt scored, nothing generated.
  req["max_tokens"] = 0;
  whole_and_streamed(req, "/v1/completions", &whole, &streamed, &finish, &completion);
  EXPECT_EQ(streamed["text"], whole["text"]);
  EXPECT_EQ(streamed["tokens"].size(), p.size());
  EXPECT_EQ(streamed["token_logprobs"], whole["logprobs"]["token_logprobs"]);
  EXPECT_EQ(completion, 0);
  EXPECT_EQ(finish, "length");
  // Logprobs without echo, cut by a stop string (the generated text's second character).
  const std::string text = s.Alone(p, 12);
  size_t c1 = 1;
  while (c1 < text.size() && (static_cast<unsigned char>(text[c1]) & 0xC0) == 0x80) ++c1;
  size_t c2 = c1 + 1;
  while (c2 < text.size() && (static_cast<unsigned char>(text[c2]) & 0xC0) == 0x80) ++c2;
  ASSERT_LT(c1, text.size());
  req = {{"model", "m"},
         {"prompt", p},
         {"max_tokens", 12},
         {"logprobs", 0},
         {"stop", text.substr(c1, c2 - c1)}};
  whole_and_streamed(req, "/v1/completions", &whole, &streamed, &finish, &completion);
  EXPECT_EQ(streamed["text"], whole["text"]);
  EXPECT_EQ(whole["finish_reason"], "stop");
  for (const char* k : {"tokens", "token_logprobs", "text_offset"})
    EXPECT_EQ(streamed[k], whole["logprobs"][k]) << k;
  // Chat: the content list.
  json chat = {{"model", "m"},
               {"messages", {{{"role", "user"}, {"content", "abc"}}}},
               {"max_tokens", 5},
               {"logprobs", true},
               {"top_logprobs", 3}};
  whole_and_streamed(chat, "/v1/chat/completions", &whole, &streamed, &finish, &completion);
  EXPECT_EQ(streamed["content"], whole["message"]["content"]);
  EXPECT_EQ(streamed["logprobs"], whole["logprobs"]["content"]);
  EXPECT_EQ(streamed["logprobs"].size(), 5u);
}

TEST(Server, AnswersAsTheModelAloneWholeAndStreamed) {
  Served s;
  httplib::Client cli("127.0.0.1", s.port);
  auto h = cli.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(json::parse(h->body)["status"], "ok");
  auto m = cli.Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(json::parse(m->body)["data"][0]["id"], "m");
  const std::vector<int32_t> p = Ids(1, 30);
  const std::string want = s.Alone(p, 12);
  json req = {{"model", "m"}, {"prompt", p}, {"max_tokens", 12}};
  auto r = cli.Post("/v1/completions", req.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  EXPECT_EQ(j["choices"][0]["text"], want);
  EXPECT_EQ(j["usage"]["prompt_tokens"], 30);
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  // The prompt stays in the prefix cache: the streamed request below prefills only its last,
  // partial block (and answers the same).
  // (The engine keeps it at the step after the request's last token: looked for until then.)
  int64_t cached = 0;
  for (int i = 0; i < 100 && cached == 0; ++i) {
    auto h2 = cli.Get("/health");
    ASSERT_TRUE(h2);
    cached = json::parse(h2->body)["cached_prompts"].get<int64_t>();
    if (cached == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(cached, 1);
  // Streamed: the chunks' texts add up to the same text, then a finish chunk and [DONE].
  req["stream"] = true;
  req["stream_options"] = {{"include_usage", true}};
  auto sr = cli.Post("/v1/completions", req.dump(), "application/json");
  ASSERT_TRUE(sr);
  ASSERT_EQ(sr->status, 200);
  std::string streamed, finish;
  int64_t completion = -1;
  size_t at = 0;
  bool done = false;
  while ((at = sr->body.find("data: ", at)) != std::string::npos) {
    const size_t end = sr->body.find("\n\n", at);
    const std::string data = sr->body.substr(at + 6, end - at - 6);
    at = end;
    if (data == "[DONE]") {
      done = true;
      break;
    }
    const json c = json::parse(data);
    if (c.contains("usage")) completion = c["usage"]["completion_tokens"];
    if (c["choices"].empty()) continue;
    streamed += c["choices"][0]["text"].get<std::string>();
    if (!c["choices"][0]["finish_reason"].is_null()) finish = c["choices"][0]["finish_reason"];
  }
  EXPECT_TRUE(done);
  EXPECT_EQ(streamed, want);
  EXPECT_EQ(json::parse(cli.Get("/health")->body)["reused_prompt_tokens"], 16);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(completion, 12);
  // A stop string cuts the text before it, whole and streamed.
  // (The stop string: the text's second character, whole: the byte model's text is any UTF-8.)
  size_t c1 = 1;
  while (c1 < want.size() && (static_cast<unsigned char>(want[c1]) & 0xC0) == 0x80) ++c1;
  size_t c2 = c1 + 1;
  while (c2 < want.size() && (static_cast<unsigned char>(want[c2]) & 0xC0) == 0x80) ++c2;
  ASSERT_LT(c1, want.size());
  {
    const std::string stop = want.substr(c1, c2 - c1);
    json st = {{"model", "m"}, {"prompt", p}, {"max_tokens", 12}, {"stop", stop}};
    auto w = cli.Post("/v1/completions", st.dump(), "application/json");
    ASSERT_TRUE(w);
    const json sj = json::parse(w->body);
    EXPECT_EQ(sj["choices"][0]["text"], want.substr(0, want.find(stop)));
    EXPECT_EQ(sj["choices"][0]["finish_reason"], "stop");
  }
  // Chat (no template for this model: the contents joined).
  json chat = {
      {"model", "m"}, {"messages", {{{"role", "user"}, {"content", "hello"}}}}, {"max_tokens", 5}};
  auto c = cli.Post("/v1/chat/completions", chat.dump(), "application/json");
  ASSERT_TRUE(c);
  ASSERT_EQ(c->status, 200) << c->body;
  const std::string chat_want = s.Alone(s.tok->Encode("hello", false), 5);
  EXPECT_EQ(json::parse(c->body)["choices"][0]["message"]["content"], chat_want);
  // Streamed chat: the assistant's role first, then the content in deltas.
  chat["stream"] = true;
  auto cs = cli.Post("/v1/chat/completions", chat.dump(), "application/json");
  ASSERT_TRUE(cs);
  std::string deltas, role;
  at = 0;
  while ((at = cs->body.find("data: {", at)) != std::string::npos) {
    const size_t end = cs->body.find("\n\n", at);
    const json d = json::parse(cs->body.substr(at + 6, end - at - 6))["choices"][0]["delta"];
    if (d.contains("role")) role = d["role"];
    if (d.contains("content")) deltas += d["content"].get<std::string>();
    at = end;
  }
  EXPECT_EQ(role, "assistant");
  EXPECT_EQ(deltas, chat_want);
}

TEST(Server, ConcurrentClientsGetTheirOwnAnswers) {
  Served s;
  const int n = 6;
  std::vector<std::string> got(n), want(n);
  for (int i = 0; i < n; ++i) want[i] = s.Alone(Ids(i, 20 + 9 * i), 10 + i);
  std::vector<std::thread> clients;
  for (int i = 0; i < n; ++i)
    clients.emplace_back([&, i] {
      httplib::Client cli("127.0.0.1", s.port);
      json req = {{"model", "m"}, {"prompt", Ids(i, 20 + 9 * i)}, {"max_tokens", 10 + i}};
      if (i % 2 == 1) req["stream"] = true;
      auto r = cli.Post("/v1/completions", req.dump(), "application/json");
      if (!r || r->status != 200) return;
      if (i % 2 == 0) {
        got[i] = json::parse(r->body)["choices"][0]["text"];
        return;
      }
      size_t at = 0;
      while ((at = r->body.find("data: {", at)) != std::string::npos) {
        const size_t end = r->body.find("\n\n", at);
        const json c = json::parse(r->body.substr(at + 6, end - at - 6));
        got[i] += c["choices"][0]["text"].get<std::string>();
        at = end;
      }
    });
  for (auto& t : clients) t.join();
  for (int i = 0; i < n; ++i) EXPECT_EQ(got[i], want[i]) << "client " << i;
}

TEST(Server, RefusesWithTheStatusAClientExpects) {
  Served s("sekrit", 4096);
  httplib::Client cli("127.0.0.1", s.port);
  const auto post = [&](const std::string& body, bool key = true) {
    httplib::Headers h;
    if (key) h.emplace("Authorization", "Bearer sekrit");
    return cli.Post("/v1/completions", h, body, "application/json");
  };
  auto h = cli.Get("/health");  // open without the key
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto no_key = post(R"({"model":"m","prompt":"a"})", false);
  ASSERT_TRUE(no_key);
  EXPECT_EQ(no_key->status, 401);
  EXPECT_EQ(json::parse(no_key->body)["error"]["type"], "authentication_error");
  auto ok = post(R"({"model":"m","prompt":"a","max_tokens":2})");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  auto big = post(R"({"model":"m","prompt":")" + std::string(5000, 'x') + R"("})");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
  auto missing = cli.Get("/v1/nothing", {{"Authorization", "Bearer sekrit"}});
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  EXPECT_FALSE(json::parse(missing->body)["error"]["message"].get<std::string>().empty());
  auto too_long = post(R"({"model":"m","prompt":")" + std::string(300, 'x') + R"("})");
  ASSERT_TRUE(too_long);
  EXPECT_EQ(too_long->status, 400);
  EXPECT_EQ(json::parse(too_long->body)["error"]["param"], "prompt");
  auto over = post(R"({"model":"m","prompt":"abc","max_tokens":300})");
  ASSERT_TRUE(over);
  EXPECT_EQ(over->status, 400);
  EXPECT_EQ(json::parse(over->body)["error"]["param"], "max_tokens");
  auto vocab = post(R"({"model":"m","prompt":[1, 99999999]})");
  ASSERT_TRUE(vocab);
  EXPECT_EQ(vocab->status, 400);
  auto bad = post("{nope");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);
}

// The command's own checks, before anything is loaded or bound.
TEST(ServeCli, RefusesImpossibleSettings) {
  test::TempDir d;
  const std::string m = ByteTokenizerModel(d);
  for (const auto& [args, want] : std::vector<std::pair<std::string, std::string>>{
           {"--port 70000", "--port 70000 is not a port"},
           {"--max-batch 0", "--max-batch 0"},
           {"--max-body 0", "--max-body 0"},
           {"--prompt-chunk -2", "--prompt-chunk -2"},
           {"--chat-template nope", "--chat-template"}}) {
    const Result r = RunNeedle("serve -m " + m + " -t 1 " + args);
    EXPECT_EQ(r.status, 1) << args << ": " << r.output;
    EXPECT_NE(r.output.find(want), std::string::npos) << r.output;
  }
  const Result h = RunNeedle("serve --help");
  EXPECT_EQ(h.status, 0);
  EXPECT_NE(h.output.find("/v1/chat/completions"), std::string::npos) << h.output;
}

}  // namespace
}  // namespace needle
