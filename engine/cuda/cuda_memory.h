// The GPU's memory as the KV cache's KVMemory (kvcache/kv_cache.h): device arenas and block
// tables, copies to and from the host, page-locked host buffers for swaps.
#pragma once

#include <memory>
#include <string>

#include "kvcache/kv_cache.h"

namespace needle::cuda {

// The current device's memory; name: for messages ("GPU 0 (NVIDIA H200) memory").
std::unique_ptr<KVMemory> MakeCudaMemory(std::string name);

}  // namespace needle::cuda
