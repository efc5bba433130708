#include <iostream>

#include "engine/backend/backend.h"
#include "engine/base/error.h"
#include "engine/cli/commands.h"
#include "engine/cli/options.h"
#include "engine/model/model.h"

namespace needle {

int CmdInfo(int argc, char** argv) {
  Options opt("needle info", "Prints a model folder's configuration and a summary of its weights.",
              {{"model", 'm', OptKind::kString, NEEDLE_DEFAULT_MODEL,
                "model folder (config.json + safetensors); default: the bundled needle-tiny"}});
  if (!opt.Parse(argc, argv)) {
    if (opt.Flag("help")) std::cout << opt.Help();
    return 0;
  }
  if (opt.Str("model").empty()) Fail("needle info: --model is required");
  const std::string dir = opt.Str("model");
  ThreadingContext tc(1);
  auto backend = MakeCpuBackend(tc, false);
  auto model = LoadModel(dir, *backend);
  const ModelWeights& w = model->weights();
  std::cout << DescribeConfig(model->config());
  std::cout << "weights             " << DTypeName(w.dtype) << ", " << w.files.size()
            << " file(s), " << w.TotalBytes() / 1e6 << " MB\n";
  const KVCacheShape s = model->CacheShape(1, w.dtype);
  std::cout << "KV bytes per token  " << s.BytesPerToken() << " (" << DTypeName(s.dtype) << ")\n";
  return 0;
}

}  // namespace needle
