// needle tokenize: text -> ids (JSON), pieces, or a count, with the model folder's tokenizer.json.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "engine/base/error.h"
#include "engine/base/mapped_file.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/tokenizer/tokenizer.h"

namespace needle {

int CmdTokenize(int argc, char** argv) {
  Options opt("needle tokenize", "Tokenizes a text with a model folder's tokenizer.json.",
              {
                  {"model", 'm', OptKind::kString, NEEDLE_DEFAULT_MODEL,
                   "model folder holding tokenizer.json (default: the bundled needle-tiny)"},
                  {"file", 'f', OptKind::kString, "", "text file to tokenize"},
                  {"text", 0, OptKind::kString, "", "text to tokenize"},
                  {"ids", 0, OptKind::kFlag, "", "print the ids as a JSON list (the default)"},
                  {"pieces", 0, OptKind::kFlag, "", "print one vocabulary piece per line"},
                  {"count", 0, OptKind::kFlag, "", "print the number of tokens"},
                  {"add-special", 0, OptKind::kFlag, "",
                   "add the post-processor's special tokens (e.g. BOS)"},
              });
  if (!opt.Parse(argc, argv)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  if (opt.Str("model").empty()) Fail("needle tokenize: --model is required");
  if (opt.Str("file").empty() == opt.Str("text").empty())
    Fail("needle tokenize: give exactly one of --file and --text");
  if (opt.Flag("pieces") + opt.Flag("count") + opt.Flag("ids") > 1)
    Fail("needle tokenize: --ids, --pieces and --count exclude each other");
  auto tok = Tokenizer::Load(opt.Str("model") + "/tokenizer.json");
  const std::string text =
      opt.Str("file").empty() ? opt.Str("text") : ReadTextFile(opt.Str("file"));
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok->Encode(text, opt.Flag("add-special"));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (opt.Flag("count")) {
    std::printf("%zu\n", ids.size());
  } else if (opt.Flag("pieces")) {
    for (int32_t id : ids) std::printf("%s\n", tok->TokenText(id).c_str());
  } else {
    std::string out = "[";
    for (size_t i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids[i]);
    std::printf("%s]\n", out.c_str());
  }
  std::fprintf(stderr, "needle: %zu bytes -> %zu tokens in %.3f s (%.1f MB/s)\n", text.size(),
               ids.size(), s, text.size() / 1e6 / std::max(s, 1e-9));
  return 0;
}

}  // namespace needle
