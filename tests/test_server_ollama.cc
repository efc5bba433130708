// needle serve's Ollama API (server/ollama.h): its requests checked field by field, and a server
// on a free local port answering /api/generate and /api/chat as the model alone (greedy), whole
// and as JSON lines, going on from a returned context, and refusing in Ollama's error format.
#include <gtest/gtest.h>
#include <httplib.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "server/ollama.h"
#include "tests/server_test_util.h"

namespace needle {
namespace {

using nlohmann::json;
using server::ApiError;
using server::ParseOllama;

// The status and param of the ApiError that parsing `body` throws (0, "" when none).
std::pair<int, std::string> Refusal(const std::string& body, bool chat = false) {
  return RefusalOf([&] { ParseOllama(body, chat, "m"); });
}

TEST(OllamaApi, ParsesRequestsAndRefusesFieldByField) {
  const auto g = ParseOllama(
      R"({"model":"m:latest","prompt":"hi","system":"be brief","context":[1,2],"keep_alive":"5m",)"
      R"("options":{"num_predict":7,"temperature":0.5,"top_k":3,"top_p":0.9,"min_p":0.1,)"
      R"("seed":42,"stop":["a","bc"],"num_ctx":100,"repeat_penalty":1.2,"repeat_last_n":-1,)"
      R"("num_thread":4,"use_mmap":true,"typical_p":1,"mirostat":0,"presence_penalty":0}})",
      false, "m");
  EXPECT_FALSE(g.r.chat);
  ASSERT_EQ(g.r.prompts.size(), 1u);
  EXPECT_EQ(g.r.prompts[0].text, "hi");
  EXPECT_EQ(g.system, "be brief");
  EXPECT_EQ(g.context, (std::vector<int32_t>{1, 2}));
  EXPECT_TRUE(g.r.stream);  // (Ollama streams unless told not to)
  EXPECT_EQ(g.r.max_tokens, 7);
  EXPECT_FLOAT_EQ(g.r.sampling.temperature, 0.5f);
  EXPECT_EQ(g.r.sampling.top_k, 3);
  EXPECT_FLOAT_EQ(g.r.sampling.top_p, 0.9f);
  EXPECT_FLOAT_EQ(g.r.sampling.min_p, 0.1f);
  EXPECT_EQ(g.r.sampling.seed, 42u);
  EXPECT_FLOAT_EQ(g.r.sampling.repetition_penalty, 1.2f);
  EXPECT_EQ(g.r.stop, (std::vector<std::string>{"a", "bc"}));
  EXPECT_EQ(g.num_ctx, 100);
  EXPECT_FALSE(g.load_only);
  // Defaults: greedy, until the context is full; -1 and -2 alike; no prompt: "load the model".
  const auto d = ParseOllama(R"({"model":"m","prompt":"x","stream":false})", false, "m");
  EXPECT_FALSE(d.r.stream);
  EXPECT_EQ(d.r.max_tokens, -1);
  EXPECT_TRUE(d.r.sampling.greedy());
  EXPECT_EQ(ParseOllama(R"({"model":"m","prompt":"x","options":{"num_predict":-2}})", false, "m")
                .r.max_tokens,
            -1);
  EXPECT_TRUE(ParseOllama(R"({"model":"m"})", false, "m").load_only);
  EXPECT_TRUE(ParseOllama(R"({"model":"m","messages":[]})", true, "m").load_only);
  // repeat_last_n 0: Ollama penalises nothing.
  EXPECT_FLOAT_EQ(ParseOllama(R"({"model":"m","prompt":"x","options":{"repeat_penalty":1.5,)"
                              R"("repeat_last_n":0}})",
                              false, "m")
                      .r.sampling.repetition_penalty,
                  1.f);
  const auto c = ParseOllama(
      R"({"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"u",)"
      R"("images":[]}],"stream":false,"tools":[],"format":""})",
      true, "m");
  ASSERT_EQ(c.r.messages.size(), 2u);
  EXPECT_EQ(c.r.messages[1].content, "u");
  using P = std::pair<int, std::string>;
  EXPECT_EQ(Refusal("{bad"), P(400, ""));
  EXPECT_EQ(Refusal(R"({"prompt":"a"})"), P(400, "model"));
  EXPECT_EQ(Refusal(R"({"model":"other","prompt":"a"})"), P(404, "model"));
  EXPECT_EQ(Refusal(R"({"model":"m:7b","prompt":"a"})"), P(404, "model"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":3})"), P(400, "prompt"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","stream":"no"})"), P(400, "stream"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","options":[1]})"), P(400, "options"));
  // Options, each refused naming itself. (Ollama's penalty window is the last 64 tokens by
  // default; needle's is the whole context: a penalty needs repeat_last_n -1.)
  for (const auto& [options, param] : std::vector<std::pair<std::string, std::string>>{
           {R"({"bogus":1})", "options.bogus"},
           {R"({"num_predict":0})", "options.num_predict"},
           {R"({"num_predict":-3})", "options.num_predict"},
           {R"({"temperature":"hot"})", "options.temperature"},
           {R"({"top_p":2})", "options.top_p"},
           {R"({"stop":[""]})", "options.stop"},
           {R"({"stop":5})", "options.stop"},
           {R"({"num_ctx":0})", "options.num_ctx"},
           {R"({"repeat_penalty":1.1})", "options.repeat_last_n"},
           {R"({"repeat_penalty":1.1,"repeat_last_n":64})", "options.repeat_last_n"},
           {R"({"mirostat":2})", "options.mirostat"},
           {R"({"typical_p":0.5})", "options.typical_p"},
           {R"({"frequency_penalty":0.5})", "options.frequency_penalty"}})
    EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","options":)" + options + "}"), P(400, param))
        << options;
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","format":"json"})"), P(400, "format"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","images":["aGk="]})"), P(400, "images"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","suffix":"b"})"), P(400, "suffix"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","template":"{{ .Prompt }}"})"),
            P(400, "template"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","think":true})"), P(400, "think"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","raw":true,"system":"s"})"), P(400, "system"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","context":[1,-2]})"), P(400, "context"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","context":"1,2"})"), P(400, "context"));
  EXPECT_EQ(Refusal(R"({"model":"m","prompt":"a","keep_alive":[]})"), P(400, "keep_alive"));
  EXPECT_EQ(
      Refusal(R"({"model":"m","messages":[{"role":"user","content":"u","images":["x"]}]})", true),
      P(400, "messages[0].images"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":[{"role":"tool","content":"x"}]})", true),
            P(400, "messages[0].role"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":"hi"})", true), P(400, "messages"));
  EXPECT_EQ(Refusal(R"({"model":"m","messages":[{"role":"user","content":"u"}],)"
                    R"("tools":[{"type":"function"}]})",
                    true),
            P(400, "tools"));
  EXPECT_EQ(json::parse(server::OllamaErrorBody(ApiError(400, "bad x", "x")))["error"], "bad x");
  EXPECT_EQ(server::ParameterSize(7615616512), "7.6B");
  EXPECT_EQ(server::ParameterSize(6687488), "6.7M");
}

// The objects of a JSON-lines body.
std::vector<json> Lines(const std::string& body) {
  std::vector<json> out;
  size_t at = 0;
  while (at < body.size()) {
    size_t end = body.find('\n', at);
    if (end == std::string::npos) end = body.size();
    if (end > at) out.push_back(json::parse(body.substr(at, end - at)));
    at = end + 1;
  }
  return out;
}

TEST(OllamaServer, AnswersAsTheModelAloneWholeStreamedAndFromAContext) {
  Served s;
  httplib::Client cli("127.0.0.1", s.port);
  const std::string prompt = "Tell me about the sea";
  const std::vector<int32_t> ids = s.tok->Encode(prompt, true);  // (as needle generate -p)
  const std::vector<int32_t> want_ids = s.AloneTokens(ids, 9);
  const std::string want = s.Alone(ids, 9);
  json req = {{"model", "m:latest"},
              {"prompt", prompt},
              {"stream", false},
              {"options", {{"num_predict", 9}}}};
  auto r = cli.Post("/api/generate", req.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  EXPECT_EQ(j["response"], json::parse(server::Dump(json(want))));
  EXPECT_EQ(j["model"], "m:latest");
  EXPECT_TRUE(j["done"].get<bool>());
  EXPECT_EQ(j["done_reason"], "length");
  EXPECT_EQ(j["prompt_eval_count"], ids.size());
  EXPECT_EQ(j["eval_count"], 9);
  EXPECT_GT(j["total_duration"].get<int64_t>(), 0);
  EXPECT_GE(j["total_duration"].get<int64_t>(), j["prompt_eval_duration"].get<int64_t>());
  // The context: the prompt's ids, then the answer's.
  std::vector<int32_t> context = ids;
  context.insert(context.end(), want_ids.begin(), want_ids.end());
  EXPECT_EQ(j["context"].get<std::vector<int32_t>>(), context);
  // Streamed (the default): one object a piece, done: false, then the last with the counts.
  req.erase("stream");
  auto sr = cli.Post("/api/generate", req.dump(), "application/json");
  ASSERT_TRUE(sr);
  ASSERT_EQ(sr->status, 200) << sr->body;
  EXPECT_EQ(sr->get_header_value("Content-Type"), "application/x-ndjson");
  const std::vector<json> lines = Lines(sr->body);
  ASSERT_GE(lines.size(), 2u);
  std::string streamed;
  for (size_t i = 0; i + 1 < lines.size(); ++i) {
    EXPECT_FALSE(lines[i]["done"].get<bool>());
    streamed += lines[i]["response"].get<std::string>();
  }
  EXPECT_EQ(streamed, j["response"]);
  EXPECT_TRUE(lines.back()["done"].get<bool>());
  EXPECT_EQ(lines.back()["eval_count"], 9);
  EXPECT_EQ(lines.back()["context"], j["context"]);
  // Going on from the context: its ids, then the new prompt's (no second BOS).
  const std::string more = " and the sky";
  std::vector<int32_t> next = context;
  for (int32_t t : s.tok->Encode(more, false)) next.push_back(t);
  json go = {{"model", "m"},
             {"prompt", more},
             {"context", context},
             {"stream", false},
             {"options", {{"num_predict", 6}}}};
  r = cli.Post("/api/generate", go.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(json::parse(r->body)["response"], json::parse(server::Dump(json(s.Alone(next, 6)))));
  EXPECT_EQ(json::parse(r->body)["prompt_eval_count"], next.size());
  // A stop option cuts the text before it, whole and streamed alike.
  size_t c1 = 1;
  while (c1 < want.size() && (static_cast<unsigned char>(want[c1]) & 0xC0) == 0x80) ++c1;
  size_t c2 = c1 + 1;
  while (c2 < want.size() && (static_cast<unsigned char>(want[c2]) & 0xC0) == 0x80) ++c2;
  ASSERT_LT(c1, want.size());
  const std::string stop = want.substr(c1, c2 - c1);
  req["options"]["stop"] = {stop};
  req["stream"] = false;
  r = cli.Post("/api/generate", req.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(json::parse(r->body)["response"],
            json::parse(server::Dump(json(want.substr(0, want.find(stop))))));
  EXPECT_EQ(json::parse(r->body)["done_reason"], "stop");
  req["stream"] = true;
  sr = cli.Post("/api/generate", req.dump(), "application/json");
  ASSERT_TRUE(sr);
  streamed.clear();
  for (const json& l : Lines(sr->body)) streamed += l["response"].get<std::string>();
  EXPECT_EQ(streamed, json::parse(r->body)["response"]);
  EXPECT_EQ(Lines(sr->body).back()["done_reason"], "stop");
  // Chat (no template for this model: the contents joined), whole and streamed.
  json chat = {{"model", "m"},
               {"messages", {{{"role", "user"}, {"content", "hello"}}}},
               {"stream", false},
               {"options", {{"num_predict", 5}}}};
  auto c = cli.Post("/api/chat", chat.dump(), "application/json");
  ASSERT_TRUE(c);
  ASSERT_EQ(c->status, 200) << c->body;
  const json cj = json::parse(c->body);
  const std::string chat_want = s.Alone(s.tok->Encode("hello", false), 5);
  EXPECT_EQ(cj["message"]["role"], "assistant");
  EXPECT_EQ(cj["message"]["content"], json::parse(server::Dump(json(chat_want))));
  EXPECT_FALSE(cj.contains("context"));
  chat.erase("stream");
  auto cs = cli.Post("/api/chat", chat.dump(), "application/json");
  ASSERT_TRUE(cs);
  std::string deltas;
  for (const json& l : Lines(cs->body)) deltas += l["message"]["content"].get<std::string>();
  EXPECT_EQ(deltas, cj["message"]["content"]);
  // "Load the model": no prompt, done at once.
  auto load = cli.Post("/api/generate", R"({"model":"m"})", "application/json");
  ASSERT_TRUE(load);
  ASSERT_EQ(load->status, 200) << load->body;
  EXPECT_EQ(Lines(load->body).at(0)["done_reason"], "load");
}

TEST(OllamaServer, DescribesTheModelAndRefusesInOllamasFormat) {
  Served s("sekrit");
  httplib::Client cli("127.0.0.1", s.port);
  const httplib::Headers key = {{"Authorization", "Bearer sekrit"}};
  auto tags = cli.Get("/api/tags", key);
  ASSERT_TRUE(tags);
  ASSERT_EQ(tags->status, 200) << tags->body;
  const json t = json::parse(tags->body)["models"].at(0);
  EXPECT_EQ(t["name"], "m:latest");
  EXPECT_EQ(t["details"]["family"], "llama");
  EXPECT_EQ(t["size"].get<int64_t>(), static_cast<int64_t>(s.model->weights().TotalBytes()));
  EXPECT_EQ(t["details"]["parameter_size"], server::ParameterSize(s.model->weights().Parameters()));
  auto show = cli.Post("/api/show", key, R"({"model":"m"})", "application/json");
  ASSERT_TRUE(show);
  ASSERT_EQ(show->status, 200) << show->body;
  const json sh = json::parse(show->body);
  EXPECT_EQ(sh["model_info"]["llama.context_length"], Served::kCtx);
  EXPECT_EQ(sh["model_info"]["llama.block_count"], s.model->config().num_layers);
  EXPECT_NE(sh["parameters"].get<std::string>().find("temperature 0"), std::string::npos);
  auto ps = cli.Get("/api/ps", key);
  ASSERT_TRUE(ps);
  EXPECT_EQ(json::parse(ps->body)["models"].at(0)["name"], "m:latest");
  auto version = cli.Get("/api/version", key);
  ASSERT_TRUE(version);
  EXPECT_TRUE(json::parse(version->body)["version"].is_string());
  // Refusals: {"error": "..."} with the status.
  const auto post = [&](const char* path, const std::string& body, bool with_key = true) {
    return cli.Post(path, with_key ? key : httplib::Headers{}, body, "application/json");
  };
  for (const auto& [path, body, status, with_key] :
       std::vector<std::tuple<const char*, std::string, int, bool>>{
           {"/api/generate", R"({"model":"m","prompt":"a"})", 401, false},
           {"/api/generate", R"({"model":"other","prompt":"a"})", 404, true},
           {"/api/show", R"({"model":"other"})", 404, true},
           {"/api/show", R"({})", 400, true},
           {"/api/nothing", R"({})", 404, true},
           {"/api/generate", "{nope", 400, true},
           {"/api/generate", R"({"model":"m","prompt":")" + std::string(300, 'x') + R"("})", 400,
            true},
           {"/api/generate",
            R"({"model":"m","prompt":"a","options":{"num_ctx":8,"num_predict":20}})", 400, true},
           {"/api/chat",
            R"({"model":"m","messages":[{"role":"user","content":"u"}],)"
            R"("options":{"top_k":"3"}})",
            400, true},
       }) {
    auto r = post(path, body, with_key);
    ASSERT_TRUE(r) << path;
    EXPECT_EQ(r->status, status) << path << " " << body << ": " << r->body;
    const json e = json::parse(r->body);
    ASSERT_TRUE(e.contains("error") && e["error"].is_string()) << r->body;
    EXPECT_FALSE(e["error"].get<std::string>().empty());
  }
  // num_ctx bounds the request: its message names it.
  auto small = post("/api/generate",
                    R"({"model":"m","prompt":"abc","options":{"num_ctx":8,"num_predict":20}})");
  ASSERT_TRUE(small);
  EXPECT_NE(small->body.find("options.num_ctx"), std::string::npos) << small->body;
  // The server still answers.
  auto ok = post("/api/generate", R"({"model":"m","prompt":"a","stream":false,)"
                                  R"("options":{"num_predict":2}})");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
}

}  // namespace
}  // namespace needle
