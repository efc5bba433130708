// needle serve and clients that go away before their answer (issue 20: "a client that
// disconnects frees its sequence"): streamed, noticed at the next write; whole, at the next
// keep-alive space; in both APIs the sequence is cancelled and the pool freed. Also: a whole
// response that takes longer than the grace period still arrives whole (after its spaces).
#include <gtest/gtest.h>
#include <httplib.h>

#include <chrono>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/server_test_util.h"

namespace needle {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// needle-tiny (its decode is slow enough to be left mid-answer), every whole response past the
// grace period at once, a keep-alive space every 50 ms.
ServedOptions Tiny() {
  ServedOptions o;
  o.model_dir = std::string(NEEDLE_MODELS_DIR) + "/needle-tiny";
  o.ctx = 65536;
  o.whole_grace = std::chrono::milliseconds(0);
  o.keepalive = std::chrono::milliseconds(50);
  return o;
}

json Health(int port) {
  httplib::Client cli("127.0.0.1", port);
  auto h = cli.Get("/health");
  return h && h->status == 200 ? json::parse(h->body) : json();
}

// Posts `body` and hangs up once `bytes` bytes of the response have come; returns them.
std::string PostAndLeave(int port, const std::string& path, const json& body, size_t bytes) {
  httplib::Client cli("127.0.0.1", port);
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  std::string got;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    got.append(data, n);
    return got.size() < bytes;  // false: the client closes the connection
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  cli.send(req, res, err);
  return got;
}

TEST(ServerClients, ALeavingClientsSequenceIsCancelled) {
  Served s(Tiny());
  // Each request would decode 60,000 tokens (many seconds) were it not cancelled.
  const json openai = {{"model", "m"},
                       {"prompt", "The grass is green and the sky is"},
                       {"max_tokens", 60000},
                       {"ignore_eos", true}};
  struct Case {
    const char* what;
    const char* path;
    json body;
    size_t bytes;  // what the client reads before it hangs up
  };
  json streamed = openai;
  streamed["stream"] = true;
  const std::vector<Case> cases = {
      {"whole (keep-alive spaces)", "/v1/completions", openai, 3},
      {"streamed", "/v1/completions", streamed, 200},
  };
  int64_t left = 0;
  for (const Case& c : cases) {
    const auto t0 = Clock::now();
    const std::string got = PostAndLeave(s.port, c.path, c.body, c.bytes);
    ++left;
    EXPECT_GE(got.size(), c.bytes) << c.what;
    if (std::string(c.what).rfind("whole", 0) == 0) {
      EXPECT_EQ(got.find_first_not_of(' '), std::string::npos) << c.what << ": " << got;
    }
    // The sequence ends (cancelled) long before its 60,000 tokens.
    json h;
    for (int i = 0; i < 1000; ++i) {
      h = Health(s.port);
      if (h["running"] == 0 && h["waiting"] == 0 && h["abandoned_sequences"] == left) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(h["abandoned_sequences"], left) << c.what << ": " << h.dump();
    EXPECT_EQ(h["running"], 0) << c.what;
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 20.0) << c.what;
  }
}

TEST(ServerClients, AWholeAnswerPastTheGracePeriodArrivesWhole) {
  ServedOptions o;  // the byte-tokenizer model
  o.whole_grace = std::chrono::milliseconds(0);
  o.keepalive = std::chrono::milliseconds(1);
  Served s(o);
  httplib::Client cli("127.0.0.1", s.port);
  const std::vector<int32_t> p = Ids(4, 40);
  auto r =
      cli.Post("/v1/completions", json{{"model", "m"}, {"prompt", p}, {"max_tokens", 30}}.dump(),
               "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200);
  const json j = json::parse(r->body);  // (white space first, then the body)
  EXPECT_EQ(j["choices"][0]["text"], s.Alone(p, 30));
  // Several prompts in one request: each choice its own answer, waited for in turn.
  const std::vector<int32_t> p2 = Ids(5, 30);
  auto m = cli.Post(
      "/v1/completions",
      json{{"model", "m"}, {"prompt", {p, p2}}, {"max_tokens", 12}, {"logprobs", 0}}.dump(),
      "application/json");
  ASSERT_TRUE(m);
  ASSERT_EQ(m->status, 200);
  const json mj = json::parse(m->body);
  ASSERT_EQ(mj["choices"].size(), 2u);
  EXPECT_EQ(mj["choices"][0]["text"], s.Alone(p, 12));
  EXPECT_EQ(mj["choices"][1]["text"], s.Alone(p2, 12));
  EXPECT_EQ(mj["choices"][1]["logprobs"]["tokens"].size(), 12u);
  EXPECT_EQ(mj["usage"]["completion_tokens"], 24);
  auto g = cli.Post(
      "/api/generate",
      json{{"model", "m"}, {"prompt", "abc"}, {"stream", false}, {"options", {{"num_predict", 20}}}}
          .dump(),
      "application/json");
  ASSERT_TRUE(g);
  ASSERT_EQ(g->status, 200);
  EXPECT_EQ(json::parse(g->body)["response"], s.Alone(s.tok->Encode("abc", true), 20));
  EXPECT_EQ(Health(s.port)["abandoned_sequences"], 0);
}

}  // namespace
}  // namespace needle
