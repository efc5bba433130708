// needle ask: questions about one document, the document's KV computed once. Every question's
// prompt (the document, then the question; or the chat template's user turn of both) is
// tokenized; the tokens all prompts begin with are prefilled once into a cache of a shared block
// pool; each question's cache then takes that cache's whole blocks by reference
// (KVCache::SharePrefix: counted once more, never copied) and prefills only the rest, its
// partial block included, before it answers.
//
// With --attention sparse on a GPU (the hybrid engine, whose caches are one sequence's) the
// document is prefilled once into the engine's caches; each question goes on from the end of the
// document's part it may reuse (as on the CPU: SparseConfig::ShareablePrefix), the caches and
// the planner rewound there first (AttentionPolicy::Rewind). The questions run one after another.
//
// With --attention sparse on the CPU the document is prefilled by a planner of its own, and
// each question has its own planner over the shared blocks: it takes the document planner's
// representatives of them (SparseAttention::AdoptRepresentatives: the same function of the same
// keys as alone), and only the prefix that leaves its answer what it is alone
// (SparseConfig::ShareablePrefix: with a sparse prefill, whole chunks and micro-batches below the
// document's last query; its last ones are prefilled again).
//
// --kv-file FILE keeps the document's KV across runs (kvcache/kv_file.h): when FILE holds this
// model's KV of the prompts' first tokens (same config and weights, KV type, block size), its
// whole blocks are loaded (mapped, checksummed) instead of prefilled; otherwise the document is
// prefilled and FILE written (with sparse attention, its blocks' representatives too). With no
// question, ask only writes FILE.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/base/error.h"
#include "engine/base/mapped_file.h"
#include "engine/base/seconds.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/cli/run_options.h"
#include "engine/cli/text_stream.h"
#include "engine/model/generate.h"
#include "engine/model/model.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_file.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {
namespace {

// One question's answer: its prompt's tokens from `reused` on prefilled into `cache` (which holds
// the first `reused` already), then generated to stdout; its numbers to stderr. adopted: the
// representatives its planner took from the document's (-1: none to say).
void Answer(Model& model, KVCache& cache, const std::vector<int32_t>& prompt, int64_t reused,
            size_t index, const std::string& question, const Tokenizer& tok,
            const std::string& stop, int64_t max_new, const SamplingParams& sp, int64_t adopted) {
  const std::vector<int32_t> rest(prompt.begin() + reused, prompt.end());
  std::printf("Q: %s\nA: ", question.c_str());
  std::fflush(stdout);
  StopStream out(tok, stop);
  GenerateStats st;
  Generate(
      model, cache, rest, max_new, sp, [&](int32_t id) { return out.Push(id); }, &st);
  out.Finish();
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr,
               "needle: question %zu: %lld of %zu prompt tokens reused%s, %lld prefilled in "
               "%.3f s; %lld tokens at %.2f tok/s%s\n",
               index + 1, static_cast<long long>(reused), prompt.size(),
               adopted >= 0 ? (" (with the representatives of " + std::to_string(adopted) +
                               " blocks x layers)")
                                  .c_str()
                            : "",
               static_cast<long long>(st.prompt_tokens), st.prefill_seconds,
               static_cast<long long>(st.new_tokens),
               st.new_tokens > 1 ? (st.new_tokens - 1) / st.decode_seconds : 0.0,
               st.stopped_at_eos ? " (stopped at EOS)" : "");
}

}  // namespace

int CmdAsk(int argc, char** argv) {
  std::vector<OptionSpec> specs = {
      {"file", 'f', OptKind::kString, "", "the document: a text file"},
      {"question", 'q', OptKind::kList, "", "a question about the document (repeat: -q A -q B)"},
      {"chat", 0, OptKind::kFlag, "",
       "format each prompt as a user turn with the model's chat template"},
      ChatTemplateSpec(),
      {"system", 0, OptKind::kString, "", "system message for --chat"},
      {"max-new-tokens", 'n', OptKind::kInt, "256", "most tokens of each answer"},
      {"stop", 0, OptKind::kString, "", "end an answer where it contains this string"},
      {"ignore-eos", 0, OptKind::kFlag, "", "do not stop at the model's EOS ids"},
      {"kv-file", 0, OptKind::kString, "",
       "the document's KV on disk: loaded when FILE holds this model's KV of it, else computed "
       "and written there"},
  };
  for (auto& o : SamplingSpecs()) specs.push_back(o);
  for (auto& o : RunOptionSpecs()) specs.push_back(o);
  Options opt("needle ask",
              "Answers questions about one document: the document is prefilled once and its KV\n"
              "reused by every question (each prefills only its own tokens). Each answer goes to\n"
              "stdout after its question; timings and the tokens reused to stderr.",
              specs);
  if (!opt.Parse(argc, argv)) {
    if (opt.Flag("help")) std::fputs(opt.Help().c_str(), stdout);
    return 0;
  }
  const SparseConfig scfg = SparseConfigFromOptions(opt);
  const bool sparse = opt.Str("attention") == "sparse";
  const SamplingParams sp = SamplingFromOptions(opt);
  const std::string model_dir = opt.Str("model");
  if (model_dir.empty()) Fail("needle ask: --model is required");
  if (opt.Str("file").empty()) Fail("needle ask: --file (the document) is required");
  const std::vector<std::string> questions = opt.List("question");
  const std::string kv_file = opt.Str("kv-file");
  if (sparse && scfg.sparse_prefill && !kv_file.empty())
    Fail(
        "needle ask: --kv-file with --prefill sparse is not supported (a KV file holds a dense "
        "prefill's KV); use --prefill dense, or no --kv-file");
  if (sparse && !opt.Str("dump-plan").empty())
    Fail("needle ask: --dump-plan is not supported (each question has a planner of its own)");
  if (questions.empty() && kv_file.empty())
    Fail(
        "needle ask: give at least one --question (-q), or --kv-file to only store the document's "
        "KV");
  for (const char* o : {"system", "chat-template"})
    if (opt.IsSet(o) && !opt.Flag("chat")) Fail("--", o, " only applies with --chat");
  const int64_t max_new = opt.Int("max-new-tokens");
  if (max_new < 1) Fail("--max-new-tokens must be at least 1 (got ", max_new, ")");

  const std::string doc = ReadTextFile(opt.Str("file"));
  auto tok = Tokenizer::Load(model_dir + "/tokenizer.json");
  std::string bos, eos;
  const ChatFamily fam =
      opt.Flag("chat") ? ChatFamilyFromOptions(opt, model_dir, &bos, &eos) : ChatFamily::kNone;
  if (opt.Flag("chat") && fam == ChatFamily::kNone)
    std::fprintf(stderr, "needle: warning: no known chat template for %s; using the raw prompt\n",
                 model_dir.c_str());
  std::vector<std::vector<int32_t>> prompts;
  // (No question: the prompt of an empty one, whose first tokens are the document's.)
  for (const std::string& q : questions.empty() ? std::vector<std::string>{""} : questions) {
    if (q.empty() && !questions.empty()) Fail("needle ask: an empty --question");
    const std::string text = doc + "\n\n" + q;
    if (fam == ChatFamily::kNone) {
      prompts.push_back(tok->Encode(text, true));
    } else {
      std::vector<ChatMessage> msgs;
      if (!opt.Str("system").empty()) msgs.push_back({"system", opt.Str("system")});
      msgs.push_back({"user", text});
      prompts.push_back(tok->Encode(FormatChat(fam, msgs, bos, eos), false));
    }
  }
  // The tokens every prompt begins with, leaving each at least one of its own.
  // a's first tokens that b begins with too, at most n.
  const auto prefix = [](const std::vector<int32_t>& a, const std::vector<int32_t>& b, size_t n) {
    n = std::min({n, a.size(), b.size()});
    return static_cast<size_t>(std::mismatch(a.begin(), a.begin() + n, b.begin()).first -
                               a.begin());
  };
  size_t common = prompts[0].size() - 1, longest = 0;
  for (const auto& p : prompts) {
    common = prefix(prompts[0], p, std::min(common, p.size() - 1));
    longest = std::max(longest, p.size());
  }
  const ModelConfig peek = LoadModelConfig(model_dir + "/config.json");
  const int64_t limit =
      opt.Int("ctx-size") > 0 ? opt.Int("ctx-size") : peek.max_position_embeddings;
  for (size_t i = 0; i < prompts.size(); ++i)
    if (limit > 0 && static_cast<int64_t>(prompts[i].size()) + max_new > limit)
      Fail("needle ask: question ", i + 1, "'s prompt has ", prompts[i].size(),
           " tokens (the document's included); with --max-new-tokens ", max_new,
           " it exceeds the context of ", limit, " tokens (--ctx-size)");

  const int64_t ctx = static_cast<int64_t>(longest) + max_new;
  RunSetup rs = MakeRunSetup(opt, ctx, false);
  Model& model = *rs.model;
  // Sparse attention on a GPU: the hybrid engine, whose caches are one sequence's. The document
  // is prefilled once into them, and each question goes on from its end (the prefix the
  // question may reuse and still answer as alone), the caches and the planner rewound there
  // before the next (AttentionPolicy::Rewind).
  const bool hybrid = sparse && model.backend().kv_memory() != nullptr;
  if (hybrid && !kv_file.empty())
    Fail(
        "needle ask: --kv-file with --attention sparse on a GPU is not supported (the hybrid "
        "engine keeps the document in caches of its own); use --device cpu, or no --kv-file");
  // A question's planner (sparse attention), over a cache of n tokens.
  const auto planner = [&](int64_t n) {
    return std::make_unique<SparseAttention>(model.config(), rs.sparse_cfg, model.backend(), *rs.tc,
                                             n, rs.kv_type);
  };
  if (opt.Flag("ignore-eos")) model.set_eos_token_ids({});
  if (const std::string note = LongContextNote(model.config(), ctx, nullptr); !note.empty())
    std::fprintf(stderr, "%s\n", note.c_str());
  const int64_t B = rs.sparse_cfg.block_size;
  // Each question's part of the document's first `shared` tokens (sparse attention: what leaves
  // its answer as it is alone).
  const auto reusable = [&](int64_t shared) {
    std::vector<int64_t> mine(prompts.size(), shared);
    if (sparse)
      for (size_t i = 0; i < prompts.size(); ++i)
        mine[i] = rs.sparse_cfg.ShareablePrefix(shared, static_cast<int64_t>(prompts[i].size()),
                                                static_cast<int64_t>(common), model.ubatch());
    return mine;
  };
  if (hybrid) {
    const std::vector<int64_t> from = reusable(static_cast<int64_t>(common) / B * B);
    AttachSequence(opt, rs, ctx);
    KVCache& cache = *rs.cache;
    // (The document's prefill is one prompt, as ShareablePrefix's donor: a sparse prefill's
    // last micro-batch differs from the others.)
    const int64_t doc = static_cast<int64_t>(common);
    std::fprintf(stderr,
                 "needle: %s, %s kernels, sparse (%s) attention, hybrid engine; %zu questions\n",
                 model.config().architecture.c_str(), model.backend().Name(),
                 rs.sparse_cfg.Describe().c_str(), questions.size());
    const auto t0 = Clock::now();
    {
      ProgressBar bar;
      model.set_progress([&](int64_t done, int64_t total) { bar.Update(done, total); });
      if (doc > 0) model.Forward(prompts[0].data(), doc, cache, false, nullptr);
      model.set_progress(nullptr);
    }
    std::fprintf(stderr, "needle: document prefilled once: %lld tokens in %.3f s\n",
                 static_cast<long long>(doc), Since(t0));
    for (size_t i = 0; i < prompts.size(); ++i) {
      rs.policy->Rewind(cache, from[i]);
      Answer(model, cache, prompts[i], from[i], i, questions[i], *tok, opt.Str("stop"), max_new, sp,
             -1);
    }
    return 0;
  }
  // A KV file of this document: as many of its whole blocks as the prompts begin with.
  int64_t from_file = 0;
  const ModelIdentity id =
      kv_file.empty() ? ModelIdentity{}
                      : IdentifyModel(model_dir, opt.Flag("dummy-weights"), opt.Str("dummy-type"));
  if (!kv_file.empty() && std::filesystem::exists(kv_file)) {
    const KVFileHeader h = ReadKVFileHeader(kv_file);
    const size_t c = prefix(prompts[0], h.tokens, common);  // (all prompts share these)
    from_file = static_cast<int64_t>(c) / B * B;
    if (from_file == 0)
      std::fprintf(stderr,
                   "needle: %s holds the KV of other tokens (%zu in common with this document's); "
                   "computing it again and writing the file anew\n",
                   kv_file.c_str(), c);
  }
  // The pool: the document's blocks and one question's (its own blocks past the shared ones).
  const int64_t shared = from_file > 0 ? from_file : static_cast<int64_t>(common) / B * B;
  const int64_t doc_blocks = (static_cast<int64_t>(common) + B - 1) / B;
  const std::vector<int64_t> mine = reusable(shared);
  const int64_t own_blocks = (ctx - *std::min_element(mine.begin(), mine.end()) + B - 1) / B;
  const KVCacheShape shape = model.CacheShape((doc_blocks + own_blocks) * B, rs.kv_type, B);
  BlockPool pool(shape, RunLimitsFromOptions(opt).kv_memory, model.backend().kv_memory());
  std::fprintf(stderr, "needle: %s, %s kernels, %s attention, KV pool %s; %zu questions\n",
               model.config().architecture.c_str(), model.backend().Name(),
               sparse ? ("sparse (" + rs.sparse_cfg.Describe() + ")").c_str() : "dense",
               FormatBytes(shape.TotalBytes()).c_str(), questions.size());

  // The document: loaded from the KV file, or prefilled once (and written to the file).
  KVCache doc_cache(pool, from_file > 0 ? from_file : static_cast<int64_t>(common));
  // Sparse attention: the document's planner computes its blocks' representatives as it
  // prefills them (a sparse prefill's selections too, as each question's alone would), and
  // every question's planner takes those of the blocks it shares (doc_reps); a KV file keeps
  // them in its extra section.
  std::unique_ptr<SparseAttention> doc_planner;
  std::unique_ptr<RepresentativeStore> file_reps;
  const RepresentativeStore* doc_reps = nullptr;
  const auto t0 = Clock::now();
  if (from_file > 0) {
    const KVFileHeader h = LoadKVFile(kv_file, doc_cache, id, from_file);
    std::fprintf(stderr, "needle: document's KV loaded from %s: %lld tokens in %.3f s\n",
                 kv_file.c_str(), static_cast<long long>(from_file), Since(t0));
    if (sparse && rs.sparse_cfg.repr != ReprType::kDynamic) {
      const auto probe = planner(B);  // (what this run's representatives are)
      if (h.extra.name == "representatives" && h.extra.meta == probe->RepresentativesKind()) {
        const RepresentativeStore& kind = probe->representatives();
        const ModelConfig& mc = model.config();
        const int64_t nb = (static_cast<int64_t>(h.tokens.size()) + B - 1) / B;
        file_reps = std::make_unique<RepresentativeStore>(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, nb, kind.type(), kind.storage());
        file_reps->LoadBlocks(h.extra.bytes, nb, kv_file);
        doc_reps = file_reps.get();
      } else {
        std::fprintf(stderr,
                     "needle: %s holds no representatives of this run's kind (%s); each question "
                     "computes them from the keys\n",
                     kv_file.c_str(), probe->RepresentativesKind().c_str());
      }
    }
  } else {
    ProgressBar bar;
    model.set_progress([&](int64_t done, int64_t total) { bar.Update(done, total); });
    if (sparse) doc_planner = planner(doc_blocks * B);
    model.set_attention(doc_planner.get());
    if (common > 0)
      model.Forward(prompts[0].data(), static_cast<int64_t>(common), doc_cache, false, nullptr);
    model.set_attention(nullptr);
    model.set_progress(nullptr);
    if (doc_planner != nullptr) doc_reps = &doc_planner->representatives();
    std::fprintf(stderr, "needle: document prefilled once: %zu tokens in %.3f s\n", common,
                 Since(t0));
    if (!kv_file.empty()) {
      if (common == 0) Fail("needle ask: the document has no tokens to store in ", kv_file);
      const auto t1 = Clock::now();
      KVFileExtra reps;  // (sparse attention: the document's representatives with its KV)
      if (doc_planner != nullptr && rs.sparse_cfg.repr != ReprType::kDynamic)
        reps = {"representatives", doc_planner->RepresentativesKind(),
                doc_reps->SaveBlocks(doc_blocks)};
      SaveKVFile(kv_file, doc_cache,
                 std::vector<int32_t>(prompts[0].begin(), prompts[0].begin() + common), id,
                 reps.name.empty() ? nullptr : &reps);
      std::fprintf(stderr, "needle: document's KV written to %s (%zu tokens) in %.3f s\n",
                   kv_file.c_str(), common, Since(t1));
    }
  }
  if (questions.empty()) return 0;

  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& p = prompts[i];
    KVCache cache(pool, static_cast<int64_t>(p.size()) + max_new);
    const int64_t P = static_cast<int64_t>(p.size());
    cache.SharePrefix(doc_cache, mine[i]);
    std::unique_ptr<SparseAttention> q_planner = sparse ? planner(P + max_new) : nullptr;
    if (q_planner != nullptr && doc_reps != nullptr)
      q_planner->AdoptRepresentatives(*doc_reps, rs.sparse_cfg, mine[i] / B);
    model.set_attention(q_planner.get());
    try {
      Answer(model, cache, p, mine[i], i, questions[i], *tok, opt.Str("stop"), max_new, sp,
             q_planner != nullptr ? q_planner->adopted_blocks() : -1);
    } catch (...) {
      model.set_attention(nullptr);
      throw;
    }
    model.set_attention(nullptr);
  }
  return 0;
}

}  // namespace needle
