// Running the needle binary from tests: its exit status and output, and the fixture model with a
// byte tokenizer that the eval tests run on.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "tests/test_util.h"

namespace needle {

struct Result {
  int status = -1;
  std::string output;  // stdout and stderr together
};

// stdout and stderr together, or stdout alone.
// env: assignments put before the command (VAR=value ...).
inline Result RunNeedle(const std::string& args, bool with_stderr = true,
                        const std::string& env = "") {
  Result r;
  // (NEEDLE_TEST_BINARY: the binary where it was carried, on the GPU machine.)
  const char* bin = std::getenv("NEEDLE_TEST_BINARY");
  const std::string cmd = env + (env.empty() ? "" : " ") +
                          std::string(bin != nullptr ? bin : NEEDLE_BINARY) + " " + args +
                          (with_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  return r;
}

inline const std::string kFx = NEEDLE_FIXTURES_DIR;

// A model folder in d: the llama_gqa4_hd64_f32 fixture with a byte tokenizer (for eval runs).
inline std::string ByteTokenizerModel(const test::TempDir& d) {
  const std::string model = d.File("m");
  std::filesystem::create_directories(model);
  for (const char* f : {"config.json", "model.safetensors", "generation_config.json"})
    std::filesystem::copy_file(kFx + "/llama_gqa4_hd64_f32/" + f, model + "/" + f);
  std::filesystem::copy_file(kFx + "/../tokenizer/bytes_tokenizer.json", model + "/tokenizer.json");
  return model;
}

}  // namespace needle
