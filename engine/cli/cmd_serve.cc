// needle serve: OpenAI's and Ollama's completion APIs over HTTP for one model (server/server.h).
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "engine/base/error.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/cli/run_options.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "server/server.h"

namespace needle {

int CmdServe(int argc, char** argv) {
  std::vector<OptionSpec> specs = {
      {"host", 0, OptKind::kString, "127.0.0.1", "address to listen on"},
      {"port", 0, OptKind::kInt, "8080", "port to listen on (0: any free port, printed)"},
      {"api-key", 0, OptKind::kString, "",
       "require this key as 'Authorization: Bearer KEY' (every endpoint but /health)"},
      {"model-name", 0, OptKind::kString, "",
       "the name requests use in \"model\" (default: the model folder's name)"},
      {"max-batch", 0, OptKind::kInt, "8", "sequences decoded at once"},
      {"prefix-cache", 0, OptKind::kInt, "16",
       "finished requests' prompts kept (their KV blocks) for later requests that begin alike, "
       "evicted least recently used first when the pool needs the blocks (0: none)"},
      {"prompt-chunk", 0, OptKind::kInt, "-1",
       "prompt tokens a sequence prefills per step while others decode (-1: the micro-batch, "
       "--ubatch: 512 on the CPU, 4096 on a GPU; 0: whole prompts)"},
      {"max-body", 0, OptKind::kInt, "8388608", "largest request body in bytes (larger: 413)"},
      ChatTemplateSpec(),
  };
  for (auto& o : RunOptionSpecs()) specs.push_back(o);
  Options opt("needle serve",
              "Serves a model over HTTP with OpenAI's APIs: POST /v1/completions and\n"
              "/v1/chat/completions (streaming as server-sent events), GET /v1/models, /health;\n"
              "and Ollama's: POST /api/generate, /api/chat (streaming as JSON lines), /api/show,\n"
              "GET /api/tags, /api/ps, /api/version.\n"
              "Concurrent requests are decoded together over one KV block pool (with sparse\n"
              "attention on a GPU, each in caches of its own: --max-batch of them, 1 by default).",
              specs);
  if (!opt.Parse(argc, argv)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  SparseConfigFromOptions(opt);  // refuse bad settings before loading anything
  const std::string model_dir = opt.Str("model");
  if (model_dir.empty()) Fail("needle serve: --model is required");
  const int64_t port = opt.Int("port"), body = opt.Int("max-body");
  int64_t batch = opt.Int("max-batch");
  if (port < 0 || port > 65535) Fail("--port ", port, " is not a port (0 to 65535)");
  if (batch < 1) Fail("--max-batch ", batch, " (at least 1)");
  if (body < 1) Fail("--max-body ", body, " (at least 1 byte)");
  if (opt.Int("prompt-chunk") < -1)
    Fail("--prompt-chunk ", opt.Int("prompt-chunk"), " (-1, 0 or more)");
  if (opt.Int("prefix-cache") < 0) Fail("--prefix-cache ", opt.Int("prefix-cache"), " (0 or more)");
  int64_t ctx = opt.Int("ctx-size");
  if (ctx == 0) {
    const ModelConfig c = LoadModelConfig(model_dir + "/config.json");
    ctx = c.max_position_embeddings > 0 ? c.max_position_embeddings : 4096;
  }
  RunSetup rs = MakeRunSetup(opt, ctx, false);
  const bool sparse = opt.Str("attention") == "sparse";
  // Sparse attention on a GPU: the hybrid engine, whose sequences run in caches of their own
  // (the Engine's slots): one unless --max-batch says otherwise, each with its share of the host
  // memory budget, made (and checked together against the GPU's memory) at start.
  const bool hybrid = sparse && rs.backend->kv_memory() != nullptr;
  if (hybrid && !opt.IsSet("max-batch")) batch = 1;
  const RunLimits limits = RunLimitsFromOptions(opt);
  auto tok = Tokenizer::Load(model_dir + "/tokenizer.json");
  server::ServerOptions so;
  so.host = opt.Str("host");
  so.port = static_cast<int>(port);
  so.api_key = opt.Str("api-key");
  so.max_body = static_cast<size_t>(body);
  so.model_name = opt.Str("model-name").empty()
                      ? std::filesystem::path(model_dir).lexically_normal().filename().string()
                      : opt.Str("model-name");
  if (so.model_name.empty()) so.model_name = "needle";
  so.chat = ChatFamilyFromOptions(opt, model_dir, &so.bos, &so.eos);
  so.model_dir = model_dir;
  EngineOptions eo;
  eo.max_batch = batch;
  eo.max_context = ctx;
  eo.kv_type = rs.kv_type;
  eo.kv_memory = limits.kv_memory;
  eo.block_size = sparse ? rs.sparse_cfg.block_size : 128;
  // (-1: the model's micro-batch, so that a prompt's step is as large as a prefill's own: on a
  // GPU 4096 tokens, on the H200 8 clients' 4K prompts 11% faster than with chunks of 512.)
  eo.prompt_chunk = opt.Int("prompt-chunk") < 0 ? rs.model->ubatch() : opt.Int("prompt-chunk");
  eo.prefix_cache = opt.Int("prefix-cache");
  if (hybrid) {
    SequenceOptions seq;
    seq.kv_type = rs.kv_type;
    seq.kv_memory = limits.kv_memory;
    seq.gpu_memory = limits.gpu_memory;
    seq.ubatch = rs.model->ubatch();
    seq.placement = limits.placement;
    eo.own_caches =
        SlotCaches(*rs.model, rs.sparse_cfg, *rs.tc, seq, batch, [](const SequenceAttention& a) {
          std::fprintf(stderr, "needle serve: a sequence's caches: %s; GPU memory: %s\n",
                       a.placement.c_str(), a.gpu_memory.c_str());
        });
  }
  server::PolicyFactory policy;
  if (sparse && !hybrid)
    policy = [&rs](int64_t n) {
      return std::make_unique<SparseAttention>(rs.model->config(), rs.sparse_cfg,
                                               rs.model->backend(), *rs.tc, n, rs.kv_type);
    };
  server::Server srv(*rs.model, *tok, eo, so, policy);
  const int bound = srv.Start();
  std::fprintf(stderr,
               "needle serve: %s on http://%s:%d (context %lld tokens, up to %lld sequences at "
               "once, %s attention, chat template %s)%s\n",
               so.model_name.c_str(), so.host.c_str(), bound, static_cast<long long>(ctx),
               static_cast<long long>(batch), opt.Str("attention").c_str(), ChatFamilyName(so.chat),
               so.api_key.empty() ? "" : ", API key required");
  srv.Wait();
  return 0;
}

}  // namespace needle
