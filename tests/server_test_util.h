// needle serve's tests (test_server.cc, test_server_ollama.cc): a server of a byte-tokenizer
// model on a free local port, and what the model answers alone.
#pragma once

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/base/threading.h"
#include "engine/model/model.h"
#include "engine/runtime/engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "server/openai.h"
#include "server/server.h"
#include "tests/cli_test_util.h"
#include "tests/fixture_util.h"
#include "tests/test_util.h"

namespace needle {

// What a test's server runs: the byte-tokenizer model by default (context 256), blocks of 16, 4
// sequences at once.
struct ServedOptions {
  std::string api_key;
  size_t max_body = 1 << 20;
  std::string model_dir;  // empty: the byte-tokenizer model
  int64_t ctx = 256;
  std::chrono::milliseconds whole_grace{2000}, keepalive{1000};
};

inline ServedOptions WithKey(const std::string& api_key, size_t max_body) {
  ServedOptions o;
  o.api_key = api_key, o.max_body = max_body;
  return o;
}

struct Served {
  test::TempDir d;
  ThreadingContext tc{2};
  std::unique_ptr<Backend> cpu = MakeCpuBackend(tc, false);
  std::string dir;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<server::Server> srv;
  int port = 0;
  int64_t ctx = 0;
  static constexpr int64_t kCtx = 256;

  explicit Served(const std::string& api_key = "", size_t max_body = 1 << 20)
      : Served(WithKey(api_key, max_body)) {}
  explicit Served(const ServedOptions& o) : ctx(o.ctx) {
    dir = o.model_dir.empty() ? ByteTokenizerModel(d) : o.model_dir;
    model = LoadModel(dir, *cpu);
    tok = Tokenizer::Load(dir + "/tokenizer.json");
    EngineOptions eo;
    eo.max_batch = 4, eo.max_context = ctx, eo.block_size = 16, eo.prompt_chunk = 16;
    eo.prefix_cache = 4;
    server::ServerOptions so;
    so.port = 0, so.model_name = "m", so.api_key = o.api_key, so.max_body = o.max_body;
    so.whole_grace = o.whole_grace, so.keepalive = o.keepalive;
    srv = std::make_unique<server::Server>(*model, *tok, eo, so);
    port = srv->Start();
  }
  // The greedy tokens of `prompt` alone, n or up to the model's end-of-sequence token (the byte
  // model has no stop here that the server would not share), and their text.
  std::vector<int32_t> AloneTokens(const std::vector<int32_t>& prompt, int64_t n) {
    KVCache cache(model->CacheShape(ctx, DType::kF32, 16));
    std::vector<int32_t> out;
    int32_t t = model->ForwardGreedy(prompt.data(), static_cast<int64_t>(prompt.size()), cache);
    for (int64_t i = 0; i < n; ++i) {
      out.push_back(t);
      const auto& eos = model->config().eos_token_ids;
      if (std::find(eos.begin(), eos.end(), t) != eos.end()) break;
      if (i + 1 < n) t = model->ForwardGreedy(&t, 1, cache);
    }
    return out;
  }
  std::string Alone(const std::vector<int32_t>& prompt, int64_t n) {
    StreamDecoder dec(*tok, true);
    std::string text;
    for (int32_t t : AloneTokens(prompt, n)) text += dec.Push(t);
    return text + dec.Flush();
  }
};

// The status and param of the ApiError (server/openai.h) that parse() throws (0, "" when none).
template <typename Parse>
std::pair<int, std::string> RefusalOf(Parse&& parse) {
  try {
    parse();
  } catch (const server::ApiError& e) {
    return {e.status, e.param};
  }
  return {0, ""};
}

// A prompt of n token ids (40-99), different for each seed.
inline std::vector<int32_t> Ids(int seed, int n) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(static_cast<int32_t>(40 + (i * 7 + seed * 13) % 60));
  return p;
}

}  // namespace needle
