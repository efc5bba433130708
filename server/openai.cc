#include "server/openai.h"

#include <cmath>
#include <limits>

#include "server/request_fields.h"

namespace needle::server {

using nlohmann::json;

using namespace fields;  // NOLINT(google-build-using-namespace)

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string ErrorBody(const ApiError& e) {
  json err = {{"message", e.what()}, {"type", e.type}, {"code", nullptr}};
  err["param"] = e.param.empty() ? json(nullptr) : json(e.param);
  return Dump(json{{"error", err}});
}

std::vector<ChatMessage> ParseMessages(const json& j) {
  if (!Has(j, "messages") || !j["messages"].is_array())
    Bad("messages", "'messages' must be an array of messages");
  if (j["messages"].empty()) Bad("messages", "'messages' is empty");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < j["messages"].size(); ++i) {
    const json& m = j["messages"][i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) Bad(at, at + " must be an object");
    if (!m.contains("role") || !m["role"].is_string())
      Bad(at + ".role", at + ".role must be a string");
    const std::string role = m["role"].get<std::string>();
    if (role != "system" && role != "user" && role != "assistant")
      Bad(at + ".role", at + ".role '" + role + "' is not system, user or assistant");
    if (!m.contains("content") || !m["content"].is_string())
      Bad(at + ".content", at + ".content must be a string");
    out.push_back({role, m["content"].get<std::string>()});
  }
  return out;
}

CompletionRequest ParseCompletion(const std::string& body, bool chat, const std::string& served) {
  json j = ParseBody(body);
  CompletionRequest r;
  r.chat = chat;
  if (!Has(j, "model")) Bad("model", "'model' is required");
  if (!j["model"].is_string()) Bad("model", "'model' must be a string");
  r.model = j["model"].get<std::string>();
  if (r.model != served)
    throw ApiError(404,
                   "the model '" + r.model + "' does not exist here (serving '" + served + "')",
                   "model", "not_found_error");
  if (chat) {
    r.messages = ParseMessages(j);
  } else {
    if (!Has(j, "prompt")) Bad("prompt", "'prompt' is required");
    const json& p = j["prompt"];
    // One prompt: a string or token ids; several: an array of those.
    const auto ids = [](const json& a, const std::string& at) {
      PromptInput in;
      for (size_t i = 0; i < a.size(); ++i) {
        if (!a[i].is_number_integer() || a[i].get<int64_t>() < 0 ||
            a[i].get<int64_t>() > std::numeric_limits<int32_t>::max())
          Bad("prompt", at + "[" + std::to_string(i) + "] is not a token id");
        in.ids.push_back(a[i].get<int32_t>());
      }
      return in;
    };
    const char* form =
        "'prompt' must be a string, an array of token ids, or an array of strings or of token-id "
        "arrays";
    if (p.is_string()) {
      r.prompts.push_back({p.get<std::string>(), {}});
    } else if (!p.is_array() || p.empty()) {
      Bad("prompt", p.is_array() ? "'prompt' is empty" : form);
    } else if (p[0].is_number_integer()) {
      r.prompts.push_back(ids(p, "prompt"));
    } else {
      if (p.size() > kMaxPrompts)
        Bad("prompt", "'prompt' holds " + std::to_string(p.size()) + " prompts; at most " +
                          std::to_string(kMaxPrompts) + " a request");
      for (size_t i = 0; i < p.size(); ++i) {
        const std::string at = "prompt[" + std::to_string(i) + "]";
        if (p[i].is_string())
          r.prompts.push_back({p[i].get<std::string>(), {}});
        else if (p[i].is_array())
          r.prompts.push_back(ids(p[i], at));
        else
          Bad("prompt", form);
      }
    }
    for (size_t i = 0; i < r.prompts.size(); ++i)
      if (r.prompts[i].text.empty() && r.prompts[i].ids.empty())
        Bad("prompt", r.prompts.size() == 1 ? "'prompt' is empty"
                                            : "prompt[" + std::to_string(i) + "] is empty");
  }
  if (chat) {
    if (Boolean(j, "logprobs"))
      r.logprobs = Has(j, "top_logprobs") ? Integer(j, "top_logprobs", 0, kMaxTopLogprobs) : 0;
    else if (Has(j, "top_logprobs"))
      Bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  } else {
    const bool off = Has(j, "logprobs") && j["logprobs"].is_boolean() && !j["logprobs"].get<bool>();
    if (Has(j, "logprobs") && !off) r.logprobs = Integer(j, "logprobs", 0, kMaxTopLogprobs);
    r.echo = Boolean(j, "echo");
  }
  const char* max_key =
      chat && Has(j, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  r.max_tokens_field = max_key;
  if (Has(j, max_key))
    r.max_tokens = Integer(j, max_key, r.echo ? 0 : 1, std::numeric_limits<int32_t>::max());
  if (Has(j, "temperature"))
    r.sampling.temperature = static_cast<float>(Number(j, "temperature", 0, 2));
  if (Has(j, "top_p")) r.sampling.top_p = static_cast<float>(Number(j, "top_p", 0, 1));
  if (Has(j, "top_k")) r.sampling.top_k = Integer(j, "top_k", 0, 1 << 30);
  if (Has(j, "min_p")) r.sampling.min_p = static_cast<float>(Number(j, "min_p", 0, 1));
  if (Has(j, "repetition_penalty"))
    r.sampling.repetition_penalty = static_cast<float>(Number(j, "repetition_penalty", 0, 10));
  if (Has(j, "seed"))
    r.sampling.seed = static_cast<uint64_t>(Integer(j, "seed", std::numeric_limits<int64_t>::min(),
                                                    std::numeric_limits<int64_t>::max()));
  try {
    r.sampling.Validate();
  } catch (const std::exception& e) {
    Bad("", e.what());
  }
  if (Has(j, "stop")) {
    const json& s = j["stop"];
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array() && s.size() <= 4) {
      for (const json& x : s) {
        if (!x.is_string()) Bad("stop", "'stop' must be a string or an array of up to 4 strings");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      Bad("stop", "'stop' must be a string or an array of up to 4 strings");
    }
    for (const auto& x : r.stop)
      if (x.empty()) Bad("stop", "'stop' holds an empty string");
  }
  r.stream = Boolean(j, "stream");
  r.ignore_eos = Boolean(j, "ignore_eos");
  if (r.stream && r.prompts.size() > 1)
    Bad("stream", "'stream' takes one prompt a request, not " + std::to_string(r.prompts.size()));
  if (Has(j, "stream_options")) {
    const json& so = j["stream_options"];
    if (!so.is_object()) Bad("stream_options", "'stream_options' must be an object");
    if (so.contains("include_usage")) {
      if (!so["include_usage"].is_boolean())
        Bad("stream_options.include_usage", "'include_usage' must be true or false");
      r.include_usage = so["include_usage"].get<bool>();
    }
  }
  if (Has(j, "n") && Integer(j, "n", 1, 1 << 20) != 1)
    Bad("n", "'n' must be 1: needle returns one choice per prompt");
  // Not done yet: refused rather than ignored.
  for (const char* key :
       {"best_of", "suffix", "logit_bias", "tools", "functions", "response_format"}) {
    if (!Has(j, key)) continue;
    const json& v = j[key];
    const bool off =
        (v.is_boolean() && !v.get<bool>()) ||
        (key == std::string("best_of") && v.is_number_integer() && v.get<int64_t>() == 1);
    if (!off) Bad(key, std::string("'") + key + "' is not supported by needle yet");
  }
  for (const char* key : {"presence_penalty", "frequency_penalty"})
    if (Has(j, key) && Number(j, key, -2, 2) != 0)
      Bad(key,
          std::string("'") + key + "' is not supported by needle yet (use repetition_penalty)");
  return r;
}

size_t StopAt(const std::string& text, const std::vector<std::string>& stop) {
  size_t at = std::string::npos;
  for (const auto& s : stop) at = std::min(at, text.find(s));
  return at;
}

namespace {
json Head(const CompletionRequest& r, const std::string& id, int64_t created, bool chunk) {
  return json{{"id", id},
              {"object",
               r.chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
              {"created", created},
              {"model", r.model}};
}
json UsageJson(const Usage& u) {
  return json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}
std::string Event(const json& j) { return "data: " + Dump(j) + "\n\n"; }
}  // namespace

json CompletionLogprobs(const std::vector<LogprobEntry>& e, size_t first_offset) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  size_t at = first_offset;
  for (const LogprobEntry& x : e) {
    tokens.push_back(x.text);
    offsets.push_back(at);
    at += x.text.size();
    if (!x.has) {
      lps.push_back(nullptr), tops.push_back(nullptr);
      continue;
    }
    lps.push_back(x.logprob);
    json top = json::object();
    for (const auto& [t, lp] : x.top)
      if (!top.contains(t)) top[t] = lp;  // (two tokens of one text: the likelier)
    tops.push_back(top);
  }
  return json{{"tokens", tokens},
              {"token_logprobs", lps},
              {"top_logprobs", tops},
              {"text_offset", offsets}};
}

namespace {
json Bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}
}  // namespace

json ChatLogprobs(const std::vector<LogprobEntry>& e) {
  json content = json::array();
  for (const LogprobEntry& x : e) {
    if (!x.has) continue;
    json top = json::array();
    for (const auto& [t, lp] : x.top)
      top.push_back({{"token", t}, {"logprob", lp}, {"bytes", Bytes(t)}});
    content.push_back({{"token", x.text},
                       {"logprob", x.logprob},
                       {"bytes", Bytes(x.text)},
                       {"top_logprobs", top}});
  }
  return json{{"content", content}};
}

json CompletionBody(const CompletionRequest& r, const std::string& id, int64_t created,
                    const std::vector<Choice>& choices, const Usage& u) {
  json j = Head(r, id, created, false);
  j["choices"] = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const Choice& c = choices[i];
    json choice = {{"index", i}, {"finish_reason", c.finish}};
    const bool lp = r.logprobs >= 0;
    if (r.chat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
      choice["logprobs"] = lp ? ChatLogprobs(c.logprobs) : json(nullptr);
    } else {
      choice["text"] = c.text;
      choice["logprobs"] = lp ? CompletionLogprobs(c.logprobs) : json(nullptr);
    }
    j["choices"].push_back(choice);
  }
  j["usage"] = UsageJson(u);
  return j;
}

std::string StreamChunk(const CompletionRequest& r, const std::string& id, int64_t created,
                        const std::string& text, const std::string& finish, const Usage* usage,
                        const json* logprobs) {
  json j = Head(r, id, created, true);
  json choice = {{"index", 0}};
  choice["finish_reason"] = finish.empty() ? json(nullptr) : json(finish);
  if (r.chat)
    choice["delta"] = text.empty() ? json::object() : json{{"content", text}};
  else
    choice["text"] = text;
  if (logprobs != nullptr || !r.chat) choice["logprobs"] = logprobs ? *logprobs : json(nullptr);
  j["choices"] = json::array({choice});
  std::string out = Event(j);
  if (usage != nullptr) {
    json u = Head(r, id, created, true);
    u["choices"] = json::array();
    u["usage"] = UsageJson(*usage);
    out += Event(u);
  }
  return out;
}

std::string StreamRoleChunk(const CompletionRequest& r, const std::string& id, int64_t created) {
  json j = Head(r, id, created, true);
  j["choices"] = json::array({json{{"index", 0},
                                   {"delta", {{"role", "assistant"}, {"content", ""}}},
                                   {"finish_reason", nullptr}}});
  return Event(j);
}

}  // namespace needle::server
