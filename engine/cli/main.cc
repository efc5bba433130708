// needle: one binary, subcommands. Errors at the boundaries are printed as one clear line and
// turn into exit code 1 (2 for usage errors); nothing is allowed to crash.
#include <cstring>
#include <exception>
#include <iostream>
#include <string>

#include "engine/base/error.h"
#include "engine/cli/commands.h"

namespace {

const char* kUsage =
    "usage: needle COMMAND [options]\n"
    "\n"
    "Long-context inference with block-sparse attention.\n"
    "\n"
    "commands:\n"
    "  generate    generate text from a prompt (greedy or sampled), streamed to stdout\n"
    "  info        print a model folder's configuration and weights summary\n"
    "  tokenize    tokenize a text with a model folder's tokenizer.json\n"
    "  eval TASK   evaluate a model on a benchmark task (InfiniteBench passkey, number_string,\n"
    "              kv_retrieval; RULER niah_*; the classic needle), configurations side by side\n"
    "  eval score  re-score a predictions file with a benchmark's own rule\n"
    "  data TASK   write a benchmark task's dataset as JSONL (the tasks of eval)\n"
    "  serve       serve the model over HTTP with OpenAI's completion APIs\n"
    "  ask         answer questions about one document, its KV computed once\n"
    "\n"
    "-m defaults to the bundled model (models/needle-tiny) everywhere.\n"
    "'needle COMMAND --help' lists the options of a command.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "generate") return needle::CmdGenerate(argc - 2, argv + 2);
    if (cmd == "info") return needle::CmdInfo(argc - 2, argv + 2);
    if (cmd == "tokenize") return needle::CmdTokenize(argc - 2, argv + 2);
    if (cmd == "eval") return needle::CmdEval(argc - 2, argv + 2);
    if (cmd == "data") return needle::CmdData(argc - 2, argv + 2);
    if (cmd == "serve") return needle::CmdServe(argc - 2, argv + 2);
    if (cmd == "ask") return needle::CmdAsk(argc - 2, argv + 2);
    std::cerr << "needle: unknown command '" << cmd << "'\n\n" << kUsage;
    return 2;
  } catch (const needle::Error& e) {
    std::cerr << "needle: error: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "needle: error: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "needle: error: " << e.what() << "\n";
    return 1;
  }
}
