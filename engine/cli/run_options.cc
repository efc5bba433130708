#include "engine/cli/run_options.h"

#include "engine/runtime/sequence_attention.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <sstream>

#include "engine/base/error.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/hybrid.h"
#endif

namespace needle {

namespace {

// The integer settings of sparse attention: flag, the SparseConfig field (whose name Validate()
// uses in its messages), help. Specs, parsing and error messages all come from this one table.
struct SparseIntOption {
  const char* flag;
  const char* field_name;
  int64_t SparseConfig::*field;
  const char* help;
};
constexpr SparseIntOption kSparseInts[] = {
    {"block-size", "block_size", &SparseConfig::block_size, "KV cache block size in tokens"},
    {"init-tokens", "init_tokens", &SparseConfig::init_tokens,
     "sparse: Initial tokens always attended (whole blocks)"},
    {"local-window", "local_window", &SparseConfig::local_window,
     "sparse: most recent tokens always attended"},
    {"topk", "topk", &SparseConfig::topk, "sparse: Context blocks attended per selection"},
    {"repr-count", "repr_count", &SparseConfig::repr_count,
     "sparse: tokens per Dynamic representative"},
    {"obs-window", "obs_window", &SparseConfig::obs_window,
     "sparse: observation queries for Dynamic and preselection"},
    {"dense-layers", "dense_layers", &SparseConfig::dense_layers,
     "sparse: first layers that attend densely"},
    {"token-step", "token_step", &SparseConfig::token_step,
     "sparse: reuse a selection for this many tokens"},
    {"layer-step", "layer_step", &SparseConfig::layer_step,
     "sparse: reuse a selection for this many layers"},
    {"preselect-blocks", "preselect_blocks", &SparseConfig::preselect_blocks,
     "sparse: SnapKV candidate blocks kept at the end of the prompt (0: off)"},
    {"preselect-pool", "preselect_pool", &SparseConfig::preselect_pool,
     "sparse: max-pool width of preselection votes"},
    {"prefill-chunk", "prefill_chunk", &SparseConfig::prefill_chunk,
     "sparse: prompt tokens per selection of --prefill sparse"},
    {"retain-blocks", "retain_blocks", &SparseConfig::retain_blocks,
     "sparse: blocks kept in the next selection for their attention mass at the previous step "
     "(the heaviest, each with its successor; at most topk/2; 0: off)"},
    {"rescore", "rescore_blocks", &SparseConfig::rescore_blocks,
     "sparse: re-rank this many best-scored candidate blocks by their best single key before "
     "taking the topk (0: off; else >= topk; at least the Context's block count, e.g. 1000000: "
     "every block, for prompts of look-alike blocks such as kv_retrieval)"},
    {"rescore-last", "rescore_last", &SparseConfig::rescore_last,
     "sparse prefill: the prompt's last query (the first answer token) re-ranks this many "
     "best-scored candidate blocks by their best single key, and seeds the decode steps' "
     "retention with them (0: as --rescore; else >= topk; the default: every block, one scan "
     "of the keys a layer per prompt)"},
    {"gpu-share", "gpu_share", &SparseConfig::gpu_share,
     "sparse on a GPU (hybrid): percent of each KV head's selected Context blocks the GPU "
     "attends at least, reading them from pinned host memory over PCIe while the CPU attends the "
     "rest; more where its block cache already holds them (0: the CPU attends them all)"},
    {"gpu-cache-blocks", "gpu_cache_blocks", &SparseConfig::gpu_cache_blocks,
     "sparse on a GPU (hybrid): extra GPU slots per sparse layer (each a block of every KV head) "
     "that keep the Context blocks the GPU attended for later steps, so that a block selected "
     "again is not read over PCIe again (0: ceil(gpu-share% of topk), one step's share; more "
     "takes GPU memory, counted in --gpu-memory)"},
};

// --prefill dense|sparse and --pos-remap none|block (also as --set values).
bool ParsePrefill(const std::string& v) {
  if (v != "dense" && v != "sparse") Fail("--prefill: '", v, "' is not dense or sparse");
  return v == "sparse";
}
bool ParsePosRemap(const std::string& v) {
  if (v != "none" && v != "block") Fail("--pos-remap: '", v, "' is not none or block");
  return v == "block";
}

}  // namespace

std::vector<OptionSpec> RunOptionSpecs() {
  const SparseConfig d;
  std::vector<OptionSpec> specs = {
      {"model", 'm', OptKind::kString, NEEDLE_DEFAULT_MODEL,
       "model folder (config.json + model.safetensors[.index.json]); default: the bundled "
       "needle-tiny"},
      {"threads", 't', OptKind::kInt, "0", "CPU threads (0: all hardware threads)"},
      {"device", 0, OptKind::kString, "auto",
       "where the model runs: cpu, cuda (cuda:N for GPU N), or auto (cuda when a GPU is "
       "present); sparse attention on a GPU is the hybrid engine (KV of sparse layers in host "
       "memory)"},
      {"gpu-memory", 0, OptKind::kString, "",
       "sparse attention on a GPU: the most GPU memory needle may use, weights included, e.g. "
       "24G (default: the GPU's free memory)"},
      {"kv-placement", 0, OptKind::kString, "auto",
       "sparse attention on a GPU: where the KV cache lives: host (the hybrid engine: sparse "
       "layers in host memory, the CPU attends part of the selected blocks), device (every "
       "layer in GPU memory, the GPU attends the selected blocks), or auto (device when it "
       "fits --gpu-memory)"},
      {"ctx-size", 'c', OptKind::kInt, "0",
       "context limit in tokens: prompt + new tokens (the KV cache is sized for what the run "
       "needs up to it; eval cuts longer prompts in the middle); 0: the model's "
       "max_position_embeddings"},
      {"kv-type", 0, OptKind::kString, "auto",
       "KV cache type: auto (the weights' type), f32, f16, bf16, int8"},
      {"kv-memory", 0, OptKind::kString, "",
       "largest KV cache allowed, e.g. 16G (default: available memory)"},
      {"ubatch", 0, OptKind::kInt, "0",
       "prompt tokens per forward step (0: 512 on the CPU, 4096 on a GPU)"},
      {"dummy-weights", 0, OptKind::kFlag, "",
       "random weights of config.json's shapes (no safetensors needed)"},
      {"dummy-type", 0, OptKind::kString, "bf16", "weight type of --dummy-weights: f32, f16, bf16"},
      {"reference-kernels", 0, OptKind::kFlag, "",
       "use the scalar reference kernels (slow; for checking)"},
      {"attention", 0, OptKind::kString, "dense", "attention over the KV cache: dense or sparse"},
      {"repr", 0, OptKind::kString, ReprTypeName(d.repr),
       "sparse: block representatives: max, mean, quest, dynamic"},
      {"select", 0, OptKind::kString, SelectModeName(d.select),
       "sparse: selection per 'layer' or per 'kvhead'"},
      {"prefill", 0, OptKind::kString, "dense",
       "sparse: how the prompt attends: dense, or sparse (chunks of --prefill-chunk tokens, each "
       "Initial + its topk blocks + Local + itself; on the CPU and the hybrid engine)"},
      {"pos-remap", 0, OptKind::kString, "none",
       "sparse: position remapping: none, or block (each query scores its Initial, selected "
       "blocks and Local keys as if they were contiguous: no distance beyond what it attends)"},
      {"attn-recall", 0, OptKind::kFlag, "",
       "report per layer the share of full attention mass attended"},
      {"dump-plan", 0, OptKind::kString, "",
       "write each decode step's sparse plan as JSON lines to FILE (- = stderr; needle eval "
       "appends them, each with its sample's config, task, length and id)"},
  };
  for (const auto& o : kSparseInts)
    specs.push_back({o.flag, 0, OptKind::kInt, std::to_string(d.*o.field), o.help});
  return specs;
}

namespace {
bool IsDir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
}  // namespace

std::string LongContextNote(const ModelConfig& m, int64_t ctx, const SparseConfig* sc) {
  const int64_t trained = m.max_position_embeddings;
  if (trained <= 0 || ctx <= trained) return "";
  std::ostringstream os;
  os << "needle: the context (up to " << ctx << " tokens) exceeds the model's trained length ("
     << trained << ", max_position_embeddings): ";
  if (sc == nullptr) {
    os << "dense attention puts every query-key distance past it where the model never saw one "
          "(--attention sparse with --prefill sparse and --pos-remap block keeps them within "
          "what each query attends)";
    return os.str();
  }
  const int64_t span = sc->init_end() + sc->topk * sc->block_size + sc->local_window +
                       (sc->sparse_prefill ? sc->prefill_chunk : 0);
  os << (sc->sparse_prefill ? "the prompt attends sparsely in chunks of " +
                                  std::to_string(sc->prefill_chunk) + " tokens"
                            : std::string("the prompt attends densely (its distances grow past "
                                          "the trained length)"))
     << "; "
     << (sc->pos_remap ? "sparse queries see their keys at remapped positions, no further than " +
                             std::to_string(span) + " tokens away"
                       : std::string("sparse queries see their keys at their true distances "
                                     "(--pos-remap block bounds them)"));
  if (sc->dense_layers > 0)
    os << "; the first " << sc->dense_layers << " layers attend "
       << (sc->sparse_prefill ? "sparsely past the trained length" : "densely at every length");
  return os.str();
}

SparseConfig SparseConfigFromOptions(const Options& opt, const std::string* attention) {
  const std::string att = attention != nullptr ? *attention : opt.Str("attention");
  if (att != "dense" && att != "sparse") Fail("--attention: '", att, "' is not dense or sparse");
  SparseConfig c;
  for (const auto& o : kSparseInts) c.*o.field = opt.Int(o.flag);
  c.repr = ParseReprType(opt.Str("repr"), "--repr");
  c.select = ParseSelectMode(opt.Str("select"), "--select");
  c.sparse_prefill = ParsePrefill(opt.Str("prefill"));
  c.pos_remap = ParsePosRemap(opt.Str("pos-remap"));
  if (c.block_size <= 0) Fail("--block-size must be positive (got ", c.block_size, ")");
  if (att == "sparse") {
    try {
      c.Validate();
    } catch (const Error& e) {
      // Name the flags rather than the internal field names.
      std::string m = e.what();
      for (const auto& o : kSparseInts) {
        const std::string from = o.field_name, to = std::string("--") + o.flag;
        for (size_t at = m.find(from); at != std::string::npos; at = m.find(from, at + to.size()))
          m.replace(at, from.size(), to);
      }
      throw Error(m);
    }
  }
  if (att == "dense") {
    // Sparse settings given with dense attention would be silently ignored: refuse them.
    for (const auto& o : kSparseInts)
      if (std::string(o.flag) != "block-size" && opt.IsSet(o.flag))
        Fail("--", o.flag, " only applies to --attention sparse");
    for (const char* o : {"repr", "select", "attn-recall", "dump-plan", "prefill", "pos-remap"})
      if (opt.IsSet(o)) Fail("--", o, " only applies to --attention sparse");
  }
  return c;
}

std::unique_ptr<Backend> MakeBackend(const std::string& device, const Options& opt,
                                     ThreadingContext& tc) {
  std::string kind = device;
  int index = 0;
  if (device.rfind("cuda:", 0) == 0) {
    kind = "cuda";
    try {
      size_t used = 0;
      index = std::stoi(device.substr(5), &used);
      if (used != device.size() - 5) throw std::invalid_argument(device);
    } catch (const std::exception&) {
      Fail("--device: '", device, "' is not cuda:N");
    }
  }
  if (kind != "cpu" && kind != "cuda" && kind != "auto")
    Fail("--device: '", device, "' is not cpu, cuda, cuda:N or auto");
#ifdef NEEDLE_HAVE_CUDA
  std::string why;
  const bool sparse = opt.Str("attention").find("sparse") != std::string::npos;
  if (kind == "auto") kind = !opt.Flag("reference-kernels") && CudaAvailable(&why) ? "cuda" : "cpu";
  if (kind == "cuda") {
    if (opt.Flag("reference-kernels"))
      Fail("--reference-kernels selects the CPU's scalar kernels: use it with --device cpu");
    auto b = MakeCudaBackend(index);
    std::fprintf(
        stderr, "needle: device %s%s\n", b->kv_memory()->Name().c_str(),
        sparse ? " (sparse attention: the hybrid engine, sparse layers' KV in host memory)" : "");
    return b;
  }
#else
  if (kind == "cuda") Fail("--device cuda: this needle was built without CUDA (no nvcc found)");
#endif
  return MakeCpuBackend(tc, opt.Flag("reference-kernels"));
}

RunLimits RunLimitsFromOptions(const Options& opt) {
  RunLimits l;
  const int64_t threads = opt.Int("threads");
  if (threads < 0 || threads > 4096)
    Fail("--threads must be between 0 (all hardware threads) and 4096 (got ", threads, ")");
  l.threads = static_cast<int>(threads);
  l.ubatch = opt.Int("ubatch");
  if (l.ubatch < 0)
    Fail("--ubatch must be positive, or 0 for the device's default (got ", l.ubatch, ")");
  l.kv_memory =
      opt.Str("kv-memory").empty() ? 0 : ParseByteSize(opt.Str("kv-memory"), "--kv-memory");
  l.gpu_memory =
      opt.Str("gpu-memory").empty() ? 0 : ParseByteSize(opt.Str("gpu-memory"), "--gpu-memory");
  if (opt.IsSet("gpu-memory") && opt.Str("attention").find("sparse") == std::string::npos)
    Fail("--gpu-memory only applies to --attention sparse on a GPU (the hybrid engine)");
  l.placement = ParseKVPlacement(opt.Str("kv-placement"), "--kv-placement");
  if (opt.IsSet("kv-placement") && opt.Str("attention").find("sparse") == std::string::npos)
    Fail("--kv-placement only applies to --attention sparse on a GPU");
  return l;
}

int64_t ResolveUbatch(int64_t ubatch, Backend& b) {
  if (ubatch > 0) return ubatch;
  return b.kv_memory() != nullptr ? 4096 : 512;
}

std::vector<OptionSpec> SamplingSpecs() {
  return {
      {"temperature", 0, OptKind::kString, "0", "sampling temperature (0: greedy)"},
      {"top-k", 0, OptKind::kInt, "0", "sample among the k most likely tokens (0: off)"},
      {"top-p", 0, OptKind::kString, "1",
       "sample within the smallest set of tokens of this probability mass (1: off)"},
      {"min-p", 0, OptKind::kString, "0",
       "drop tokens less likely than min-p times the most likely (0: off)"},
      {"repetition-penalty", 0, OptKind::kString, "1",
       "penalise tokens already in the context (1: off)"},
      {"seed", 0, OptKind::kInt, "0", "random seed of sampling"},
  };
}

namespace {
float ParseFloat(const std::string& s, const std::string& what) {
  size_t pos = 0;
  float v = 0;
  try {
    v = std::stof(s, &pos);
  } catch (...) {
    pos = 0;
  }
  if (s.empty() || pos != s.size()) Fail(what, " expects a number, got '", s, "'");
  return v;
}
}  // namespace

SamplingParams SamplingFromOptions(const Options& opt) {
  SamplingParams sp;
  sp.temperature = ParseFloat(opt.Str("temperature"), "--temperature");
  sp.top_k = opt.Int("top-k");
  sp.top_p = ParseFloat(opt.Str("top-p"), "--top-p");
  sp.min_p = ParseFloat(opt.Str("min-p"), "--min-p");
  sp.repetition_penalty = ParseFloat(opt.Str("repetition-penalty"), "--repetition-penalty");
  sp.seed = static_cast<uint64_t>(opt.Int("seed"));
  sp.Validate();
  return sp;
}

OptionSpec ChatTemplateSpec() {
  return {"chat-template", 0, OptKind::kString, "auto",
          "chat template: auto (from tokenizer_config.json), llama3, chatml, mistral, none"};
}

ChatFamily ChatFamilyFromOptions(const Options& opt, const std::string& model_dir, std::string* bos,
                                 std::string* eos) {
  ChatFamily fam = DetectChatFamilyFromFolder(model_dir, bos, eos);
  if (opt.Str("chat-template") != "auto")
    fam = ParseChatFamily(opt.Str("chat-template"), "--chat-template");
  return fam;
}

std::unique_ptr<Model> LoadModelFromOptions(const Options& opt, Backend& backend,
                                            ThreadingContext& tc, const BeforeUpload& fits) {
  const std::string model_path = opt.Str("model");
  if (!opt.Flag("dummy-weights")) return LoadModel(model_path, backend, fits);
  const std::string cfg = IsDir(model_path) ? model_path + "/config.json" : model_path;
  // A 7B model's random weights take a minute and 15 GB: say so, and how far it got (every
  // tenth, on one line on a terminal).
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  int shown = -1;
  return MakeDummyModel(
      cfg, ParseFloatDType(opt.Str("dummy-type"), "--dummy-type"), backend, tc,
      [&](size_t done, size_t total) {
        const int tenth = total ? static_cast<int>(10 * done / total) : 10;
        if (tenth == shown) return;
        shown = tenth;
        std::fprintf(stderr,
                     tty ? "\rneedle: random weights (--dummy-weights): %d%% of %s"
                         : "needle: random weights (--dummy-weights): %d%% of %s\n",
                     10 * tenth, FormatBytes(total).c_str());
        if (tty && tenth == 10) std::fprintf(stderr, "\n");
      },
      fits);
}

RunSetup MakeRunSetup(const Options& opt, int64_t ctx, bool sequence) {
  RunSetup rs;
  rs.sparse_cfg = SparseConfigFromOptions(opt);
  const std::string model_path = opt.Str("model");
  if (model_path.empty()) Fail("--model is required");
  RunLimits limits = RunLimitsFromOptions(opt);

  rs.tc = std::make_unique<ThreadingContext>(limits.threads);
  rs.backend = MakeBackend(opt.Str("device"), opt, *rs.tc);
  limits.ubatch = ResolveUbatch(limits.ubatch, *rs.backend);
  const std::string kvs = opt.Str("kv-type");
  // The hybrid's GPU budget is checked with the weights in host memory, before any is copied.
  const BeforeUpload fits = [&](const ModelConfig& m, const ModelWeights& w) {
    SequenceOptions so;
    so.ctx = ctx;
    so.kv_type = kvs == "auto" ? w.dtype : ParseKVType(kvs, "--kv-type");
    so.gpu_memory = limits.gpu_memory;
    so.ubatch = limits.ubatch;
    so.placement = limits.placement;
    CheckSequenceFits(*rs.backend, m, w,
                      opt.Str("attention") == "sparse" ? &rs.sparse_cfg : nullptr, so);
  };
  rs.model = LoadModelFromOptions(opt, *rs.backend, *rs.tc, fits);
  rs.model->set_ubatch(limits.ubatch);
  rs.kv_type = kvs == "auto" ? rs.model->weights().dtype : ParseKVType(kvs, "--kv-type");
  if (sequence) AttachSequence(opt, rs, ctx);
  return rs;
}

void AttachSequence(const Options& opt, RunSetup& rs, int64_t ctx) {
  RunLimits limits = RunLimitsFromOptions(opt);
  limits.ubatch = rs.model->ubatch();
  const KVCacheShape shape = rs.model->CacheShape(ctx, rs.kv_type, rs.sparse_cfg.block_size);
  std::fprintf(stderr, "needle: KV cache %lld tokens x %zu bytes (%s) = %s\n",
               static_cast<long long>(ctx), shape.BytesPerToken(), KVTypeName(rs.kv_type),
               FormatBytes(shape.TotalBytes()).c_str());
  SequenceOptions so;
  so.ctx = ctx;
  so.kv_type = rs.kv_type;
  so.kv_memory = limits.kv_memory;
  so.gpu_memory = limits.gpu_memory;
  so.ubatch = limits.ubatch;
  so.placement = limits.placement;
  const bool sparse = opt.Str("attention") == "sparse";
  SequenceAttention seq =
      MakeSequenceAttention(*rs.model, sparse ? &rs.sparse_cfg : nullptr, *rs.tc, so);
  rs.cache = std::move(seq.cache);
  rs.policy = std::move(seq.policy);
  rs.sparse = seq.planner;
  if (seq.hybrid)
    std::fprintf(stderr, "needle: %s; GPU memory: %s\n", seq.placement.c_str(),
                 seq.gpu_memory.c_str());
  if (sparse) {
    rs.sparse->set_recall(opt.Flag("attn-recall"));
    const std::string dump = opt.Str("dump-plan");
    if (dump == "-") {
      rs.sparse->set_plan_sink(&std::cerr);
    } else if (!dump.empty()) {
      rs.plan_file = std::make_unique<std::ofstream>(dump);
      if (!*rs.plan_file) Fail("--dump-plan: cannot write ", dump);
      rs.sparse->set_plan_sink(rs.plan_file.get());
    }
    rs.model->set_attention(rs.policy.get());
    std::fprintf(stderr, "needle: sparse attention: %s\n", rs.sparse_cfg.Describe().c_str());
  }
}

void ApplySparseSetting(SparseConfig* c, const std::string& flag, const std::string& value) {
  if (flag == "repr") {
    c->repr = ParseReprType(value, "--repr");
    return;
  }
  if (flag == "select") {
    c->select = ParseSelectMode(value, "--select");
    return;
  }
  if (flag == "prefill") {
    c->sparse_prefill = ParsePrefill(value);
    return;
  }
  if (flag == "pos-remap") {
    c->pos_remap = ParsePosRemap(value);
    return;
  }
  for (const auto& o : kSparseInts) {
    if (flag != o.flag) continue;
    size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(value, &pos);
    } catch (...) {
      pos = 0;
    }
    if (value.empty() || pos != value.size())
      Fail("--", flag, " expects an integer, got '", value, "'");
    c->*o.field = v;
    return;
  }
  Fail("--set: '", flag, "' is not a sparse attention setting");
}

void PrintRecall(const RunSetup& rs) {
  if (rs.sparse == nullptr) return;
  const auto r = rs.sparse->RecallPerLayer();
  if (r.empty() || r[0] < 0) return;
  std::fprintf(stderr, "needle: attention recall per layer:");
  for (double x : r) std::fprintf(stderr, " %.4f", x);
  std::fprintf(stderr, "\n");
}

void PrintHybridSplit(RunSetup& rs) {
#ifdef NEEDLE_HAVE_CUDA
  auto* h = dynamic_cast<HybridAttention*>(rs.policy.get());
  if (h == nullptr) return;
  h->SyncStats();
  const HybridStats& a = h->stats();
  if (a.steps == 0) return;
  const double n = static_cast<double>(a.steps), ms = 1e3;
  const double blocks = static_cast<double>(a.gpu_blocks + a.cpu_blocks);
  std::fprintf(stderr,
               "needle: hybrid decode, %lld steps, per step: planner %.3f ms, CPU attention %.3f "
               "ms, copies %.3f ms, waiting for the GPU %.3f ms; ",
               static_cast<long long>(a.steps), a.plan / n * ms, a.cpu_attend / n * ms,
               a.copies / n * ms, a.gpu_wait / n * ms);
  if (blocks > 0)
    std::fprintf(stderr,
                 "Context blocks: %.1f%% on the GPU (%.1f%% of those already in its memory), "
                 "%.1f%% copied to it in the background\n",
                 100.0 * static_cast<double>(a.gpu_blocks) / blocks,
                 a.gpu_blocks > 0
                     ? 100.0 * static_cast<double>(a.gpu_reused) / static_cast<double>(a.gpu_blocks)
                     : 0.0,
                 100.0 * static_cast<double>(a.gpu_filled) / blocks);
  else
    std::fprintf(stderr, "no Context blocks\n");
#else
  (void)rs;
#endif
}

}  // namespace needle
