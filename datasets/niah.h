// The classic needle-in-a-haystack test (gkamradt/LLMTest_NeedleInAHaystack, quoted in
// ../shared/reference/eval_datasets.md): a needle sentence spliced into an essay haystack at a
// sentence boundary, over a grid of context lengths x depths (linear or sigmoid spacing),
// lengths counted in the evaluated model's tokens. The haystack is the user's text files
// (--haystack) or, by default, the Jargon File that the Debian package jargon-text installs
// (public domain); no third-party text lives in the repository.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "datasets/infinitebench.h"
#include "engine/tokenizer/tokenizer.h"

namespace needle::datasets {

struct NiahOptions {
  std::string needle =
      "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
      "sunny day.\n";
  std::string question = "What is the best thing to do in San Francisco?";
  std::vector<std::string> keywords = {"dolores",
                                       "sandwich"};  // the original's substring_match rule
  int64_t buffer = 200;  // tokens kept free, as final_context_length_buffer
};

extern const char* kDefaultHaystack;  // /usr/share/doc/jargon-text/jargon.txt.gz

// round(linspace(0, 100, n)) and the original's sigmoid spacing (0 and 100 kept as they are).
std::vector<double> LinearDepths(int64_t n);
std::vector<double> SigmoidDepths(int64_t n);

// Text of the files (a folder: its *.txt and *.txt.gz files in name order); .gz is inflated.
// Lines drawn with box characters (the Jargon File's tables) are dropped. Throws naming a path.
std::string LoadHaystack(const std::vector<std::string>& paths);

// The prompt: Anthropic provider's layout of the original, as raw text.
std::string NiahPrompt(const std::string& context, const std::string& question);
// Its chat form: system and user messages of the OpenAI provider.
std::string NiahSystem();
std::string NiahUser(const std::string& context, const std::string& question);

// One sample per (length, depth); answer = keywords. count_prompt_overhead: tokens of the prompt
// around the context (template and question), which the length budget includes.
std::vector<Sample> GenerateNiah(const Tokenizer& tok, const std::string& haystack,
                                 const std::vector<int64_t>& lengths,
                                 const std::vector<double>& depths, int64_t prompt_overhead,
                                 const NiahOptions& o);

}  // namespace needle::datasets
