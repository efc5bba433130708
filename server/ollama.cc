#include "server/ollama.h"

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <limits>

#include "engine/base/error.h"
#include "engine/model/model.h"
#include "kvcache/kv_file.h"
#include "server/request_fields.h"

namespace needle::server {

using nlohmann::json;
using namespace fields;  // NOLINT(google-build-using-namespace)

bool SameOllamaModel(const std::string& given, const std::string& served) {
  return given == served || given == served + ":latest";
}

namespace {

// A field that needle does not do, refused unless it holds its "off" value: empty, false or null.
void RefuseUnlessOff(const json& j, const char* key, const std::string& at, const char* why) {
  if (!Has(j, key)) return;
  const json& v = j[key];
  const bool off = (v.is_boolean() && !v.get<bool>()) ||
                   (v.is_string() && v.get_ref<const std::string&>().empty()) ||
                   (v.is_array() && v.empty()) || (v.is_object() && v.empty());
  if (!off) Bad(at + key, "'" + at + key + "' is not supported by needle: " + why);
}

// options: {...} into q (see the header for the mapping).
void ParseOptions(const json& o, OllamaRequest& q) {
  const std::string at = "options.";
  SamplingParams& s = q.r.sampling;
  for (auto it = o.begin(); it != o.end(); ++it) {
    const std::string& k = it.key();
    const char* key = k.c_str();
    if (it.value().is_null()) continue;
    if (k == "temperature") {
      s.temperature = static_cast<float>(Number(o, key, 0, 100, at));
    } else if (k == "top_k") {
      s.top_k = Integer(o, key, 0, 1 << 30, at);
    } else if (k == "top_p") {
      s.top_p = static_cast<float>(Number(o, key, 0, 1, at));
    } else if (k == "min_p") {
      s.min_p = static_cast<float>(Number(o, key, 0, 1, at));
    } else if (k == "seed") {
      s.seed = static_cast<uint64_t>(Integer(o, key, std::numeric_limits<int64_t>::min(),
                                             std::numeric_limits<int64_t>::max(), at));
    } else if (k == "num_predict") {
      const int64_t n = Integer(o, key, -2, std::numeric_limits<int32_t>::max(), at);
      if (n == 0)
        Bad(at + k,
            "'options.num_predict' is 0: nothing would be generated (1 or more, or -1 "
            "until the context is full)");
      q.r.max_tokens = n < 0 ? -1 : n;
    } else if (k == "stop") {
      const json& v = it.value();
      const bool ok = v.is_string() || v.is_array();
      if (!ok) Bad(at + k, "'options.stop' must be an array of strings");
      for (const json& x : v.is_string() ? json::array({v}) : v) {
        if (!x.is_string() || x.get<std::string>().empty())
          Bad(at + k, "'options.stop' must be an array of non-empty strings");
        q.r.stop.push_back(x.get<std::string>());
      }
    } else if (k == "num_ctx") {
      q.num_ctx = Integer(o, key, 1, kMaxContext, at);
    } else if (k == "repeat_penalty") {
      s.repetition_penalty = static_cast<float>(Number(o, key, 0, 10, at));
    } else if (k == "repeat_last_n") {
      Integer(o, key, -1, kMaxContext, at);  // (checked with repeat_penalty below)
    } else if (k == "typical_p" || k == "tfs_z") {
      if (Number(o, key, 0, 1, at) != 1)
        Bad(at + k, "'" + at + k + "' is not supported by needle (only 1, off)");
    } else if (k == "presence_penalty" || k == "frequency_penalty") {
      if (Number(o, key, -2, 2, at) != 0)
        Bad(at + k, "'" + at + k + "' is not supported by needle (use options.repeat_penalty)");
    } else if (k == "mirostat") {
      if (Integer(o, key, 0, 2, at) != 0)
        Bad(at + k, "'options.mirostat' is not supported by needle (only 0, off)");
    } else if (k == "mirostat_tau" || k == "mirostat_eta") {
      Number(o, key, -1e9, 1e9, at);  // (nothing with mirostat off)
    } else if (k == "num_gpu" || k == "num_thread" || k == "num_batch" || k == "main_gpu" ||
               k == "num_keep") {
      Integer(o, key, -1, std::numeric_limits<int32_t>::max(), at);  // the server's settings
    } else if (k == "use_mmap" || k == "use_mlock" || k == "numa" || k == "low_vram" ||
               k == "f16_kv" || k == "vocab_only" || k == "penalize_newline") {
      Boolean(o, key, false, at);  // the server's settings
    } else {
      Bad(at + k, "'" + at + k + "' is not an option needle knows");
    }
  }
  if (s.repetition_penalty != 1.f) {
    const bool whole = Has(o, "repeat_last_n") && o["repeat_last_n"].get<int64_t>() == -1;
    const bool none = Has(o, "repeat_last_n") && o["repeat_last_n"].get<int64_t>() == 0;
    if (none)
      s.repetition_penalty = 1.f;  // (Ollama: a window of 0 tokens penalises nothing)
    else if (!whole)
      Bad(at + "repeat_last_n",
          "'options.repeat_penalty' needs 'options.repeat_last_n': -1: needle's penalty covers "
          "the whole context, not the last 64 tokens (Ollama's default window)");
  }
}

}  // namespace

OllamaRequest ParseOllama(const std::string& body, bool chat, const std::string& served) {
  const json j = ParseBody(body);
  OllamaRequest q;
  CompletionRequest& r = q.r;
  r.chat = chat;
  r.model = String(j, "model");
  if (r.model.empty()) Bad("model", "'model' is required");
  if (!SameOllamaModel(r.model, served))
    throw ApiError(404, "model '" + r.model + "' not found (serving '" + served + "')", "model",
                   "not_found_error");
  r.max_tokens_field = "options.num_predict";
  if (chat) {
    if (!Has(j, "messages") || (j["messages"].is_array() && j["messages"].empty())) {
      q.load_only = true;
    } else {
      if (j["messages"].is_array())
        for (size_t i = 0; i < j["messages"].size(); ++i) {
          const json& m = j["messages"][i];
          if (!m.is_object()) continue;  // (ParseMessages names it)
          const std::string at = "messages[" + std::to_string(i) + "].";
          RefuseUnlessOff(m, "images", at, "it serves text models");
          RefuseUnlessOff(m, "tool_calls", at, "no tools");
        }
      r.messages = ParseMessages(j);
    }
    RefuseUnlessOff(j, "tools", "", "no tools");
  } else {
    const std::string prompt = String(j, "prompt");
    q.system = String(j, "system");
    q.raw = Boolean(j, "raw");
    if (q.raw && !q.system.empty())
      Bad("system", "'system' has no place in a raw prompt (raw: true sends the prompt as it is)");
    if (prompt.empty())
      q.load_only = true;
    else
      r.prompts.push_back({prompt, {}});
    if (Has(j, "context")) {
      const json& c = j["context"];
      if (!c.is_array()) Bad("context", "'context' must be an array of token ids");
      for (size_t i = 0; i < c.size(); ++i) {
        if (!c[i].is_number_integer() || c[i].get<int64_t>() < 0 ||
            c[i].get<int64_t>() > std::numeric_limits<int32_t>::max())
          Bad("context", "context[" + std::to_string(i) + "] is not a token id");
        q.context.push_back(c[i].get<int32_t>());
      }
    }
    RefuseUnlessOff(j, "suffix", "", "no fill-in-the-middle");
    RefuseUnlessOff(j, "template", "", "the chat template is the server's (--chat-template)");
    RefuseUnlessOff(j, "images", "", "it serves text models");
  }
  r.stream = Boolean(j, "stream", true);
  RefuseUnlessOff(j, "format", "", "no constrained (JSON) output");
  RefuseUnlessOff(j, "think", "", "no thinking models");
  RefuseUnlessOff(j, "logprobs", "", "use /v1/completions for log-probabilities");
  if (Has(j, "keep_alive") && !j["keep_alive"].is_number() && !j["keep_alive"].is_string())
    Bad("keep_alive", "'keep_alive' must be a duration (\"5m\") or a number of seconds");
  if (Has(j, "options")) {
    if (!j["options"].is_object()) Bad("options", "'options' must be an object");
    ParseOptions(j["options"], q);
  }
  try {
    r.sampling.Validate();
  } catch (const std::exception& e) {
    Bad("options", e.what());
  }
  return q;
}

std::string OllamaErrorBody(const ApiError& e) { return Dump(json{{"error", e.what()}}); }

std::string OllamaTime(std::chrono::system_clock::time_point t) {
  const auto ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  const std::time_t s = static_cast<std::time_t>(ns / 1000000000);
  std::tm tm{};
  gmtime_r(&s, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%09lldZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<long long>(ns % 1000000000));
  return buf;
}

json OllamaObject(const OllamaRequest& q, const std::string& created_at, const std::string& text,
                  const OllamaDone* done) {
  json j = {{"model", q.r.model}, {"created_at", created_at}};
  if (q.r.chat)
    j["message"] = {{"role", "assistant"}, {"content", text}};
  else
    j["response"] = text;
  j["done"] = done != nullptr;
  if (done == nullptr) return j;
  const auto ns = [](double s) { return static_cast<int64_t>(s * 1e9); };
  j["done_reason"] = done->reason;
  if (done->context != nullptr) j["context"] = *done->context;
  j["total_duration"] = ns(done->total_seconds);
  j["load_duration"] = 0;
  j["prompt_eval_count"] = done->prompt_tokens;
  j["prompt_eval_duration"] = ns(done->prompt_seconds);
  j["eval_count"] = done->eval_tokens;
  j["eval_duration"] = ns(done->eval_seconds);
  return j;
}

std::string ParameterSize(int64_t parameters) {
  const double p = static_cast<double>(parameters);
  char buf[32];
  if (p >= 1e9)
    std::snprintf(buf, sizeof buf, "%.1fB", p / 1e9);
  else if (p >= 1e6)
    std::snprintf(buf, sizeof buf, "%.1fM", p / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%.1fK", p / 1e3);
  return buf;
}

namespace {
json Details(const ServedModel& m) {
  const std::string family = ArchName(m.config.arch);
  return json{{"parent_model", ""},
              {"format", "safetensors"},
              {"family", family},
              {"families", json::array({family})},
              {"parameter_size", ParameterSize(m.parameters)},
              {"quantization_level", m.dtype}};
}
}  // namespace

json OllamaModelEntry(const ServedModel& m) {
  return json{{"name", m.name + ":latest"},   {"model", m.name + ":latest"},
              {"modified_at", m.modified_at}, {"size", m.size_bytes},
              {"digest", m.digest},           {"details", Details(m)}};
}

json OllamaShow(const ServedModel& m) {
  const ModelConfig& c = m.config;
  const std::string a = ArchName(c.arch);
  json info = {{"general.architecture", a},
               {"general.parameter_count", m.parameters},
               {a + ".context_length", m.context},
               {a + ".embedding_length", c.hidden_size},
               {a + ".feed_forward_length", c.intermediate_size},
               {a + ".block_count", c.num_layers},
               {a + ".attention.head_count", c.num_heads},
               {a + ".attention.head_count_kv", c.num_kv_heads},
               {a + ".attention.key_length", c.head_dim},
               {a + ".attention.layer_norm_rms_epsilon", c.rms_norm_eps},
               {a + ".rope.freq_base", c.rope.theta},
               {a + ".vocab_size", c.vocab_size}};
  return json{{"modelfile", "# served by needle\nFROM " + m.name + "\n"},
              {"parameters", m.sampling},
              {"template", m.chat},
              {"details", Details(m)},
              {"model_info", info},
              {"capabilities", json::array({"completion"})},
              {"modified_at", m.modified_at}};
}

ServedModel DescribeServedModel(const std::string& name, const std::string& dir, const Model& model,
                                int64_t context, const std::string& chat) {
  namespace fs = std::filesystem;
  ServedModel m;
  m.name = name;
  m.config = model.config();
  m.parameters = model.weights().Parameters();
  m.dtype = DTypeName(model.weights().dtype);
  m.context = context;
  m.chat = chat;
  const SamplingParams d;
  m.sampling = "temperature " + json(d.temperature).dump() + "\ntop_k " + std::to_string(d.top_k) +
               "\ntop_p " + json(d.top_p).dump() + "\nmin_p " + json(d.min_p).dump() +
               "\nrepeat_penalty " + json(d.repetition_penalty).dump() + "\nnum_ctx " +
               std::to_string(context);
  auto newest = std::chrono::system_clock::now();
  m.size_bytes = static_cast<int64_t>(model.weights().TotalBytes());
  std::error_code ec;
  if (!dir.empty() && fs::is_directory(dir, ec)) {
    int64_t bytes = 0;
    auto t = fs::file_time_type::min();
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.is_regular_file() && e.path().extension() == ".safetensors") {
        bytes += static_cast<int64_t>(e.file_size());
        t = std::max(t, e.last_write_time());
      }
    if (bytes > 0) {
      m.size_bytes = bytes;
      newest = std::chrono::time_point_cast<std::chrono::system_clock::duration>(
          std::chrono::file_clock::to_sys(t));
    }
    try {
      m.digest = ConfigHash(dir);
    } catch (const Error&) {
      // (no config.json: no digest)
    }
  }
  m.modified_at = OllamaTime(newest);
  return m;
}

}  // namespace needle::server
