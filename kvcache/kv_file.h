// KV files: a prompt's KV cache on disk, so that a document is prefilled once and reused by
// later runs (needle ask --kv-file; issue 20's "compute once, use many").
//
// File layout (little-endian):
//   [0, 32)   "NEEDLEKV", u32 version (1), u32 header bytes H, u64 XXH3-64 of the header,
//             u64 payload offset (a multiple of 4096)
//   [32, 32+H) the header, JSON: the model's identity (XXH3-64 of its config.json and of its
//             weight files' bytes), the cache's dtype, block size and layout (layers, KV heads,
//             head_dim, "blocks [layer][block][K then V][kv_head][block_size][head_dim]"), the
//             token ids, the payload's bytes and its XXH3-64
//   payload   for each layer, for each of the ceil(tokens / block_size) blocks, the K block then
//             the V block exactly as the cache's slots hold them (KVCache::BlockData)
//   extra     optional, right after the payload: one named section of bytes that describe the
//             prompt's blocks (the sparse planner's representatives), its name, a JSON text that
//             says what they are, its length and XXH3-64 in the header's "extra"
// A file is written as PATH.tmp.PID, synced, then renamed over PATH: a write killed midway
// leaves no file at PATH that loads. Loading maps the file (no read into a buffer) and refuses,
// naming the mismatch, another model, dtype, block size or layout, a bad checksum, a truncated
// file; only then are blocks copied into the cache (host memcpy, or a copy to the GPU).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvcache/kv_cache.h"

namespace needle {

// What a KV file must have been computed by: hex XXH3-64 hashes.
struct ModelIdentity {
  std::string config_hash;   // of config.json's bytes
  std::string weights_hash;  // of the weight files' bytes (*.safetensors, by name), or
                             // "dummy:<type>" for --dummy-weights
};
// Hex XXH3-64 of the config.json of folder `dir` (or of the file `dir`): ModelIdentity's
// config_hash. Throws Error naming the file when it cannot be read.
std::string ConfigHash(const std::string& dir);
// The identity of the model folder `dir` (reads every weight byte once: seconds for a 7B model).
ModelIdentity IdentifyModel(const std::string& dir, bool dummy = false,
                            const std::string& dummy_type = "");

// A KV file's optional extra section: what describes the prompt's blocks beyond their K/V.
struct KVFileExtra {
  std::string name;  // e.g. "representatives"
  std::string meta;  // what the bytes are (a JSON text; compared whole by the reader)
  std::vector<uint8_t> bytes;
};

// Writes the first `tokens.size()` tokens of `cache` (whole blocks; its size at least that) with
// their ids, and `extra` when given. Throws Error naming the path on any failure (the previous
// file stays as it was). An int8 cache's blocks carry their scales; caches with ring layers (the
// hybrid engine's, which hold only their window) are refused.
void SaveKVFile(const std::string& path, const KVCache& cache, const std::vector<int32_t>& tokens,
                const ModelIdentity& id, const KVFileExtra* extra = nullptr);

// The header of a KV file, checked (magic, version, header checksum); Error names the path.
struct KVFileHeader {
  ModelIdentity model;
  DType dtype = DType::kF32;
  int64_t block_size = 0, layers = 0, kv_heads = 0, head_dim = 0;
  std::vector<int32_t> tokens;
  // LoadKVFile: the extra section, its checksum checked (name empty: none); the header alone
  // carries its name and meta only.
  KVFileExtra extra;
};

// Checks `path` against the cache's shape and `id` and the payload's checksum, then loads its
// first `n` tokens (n <= the file's; a multiple of the block size, or all of them) into `cache`
// (empty, of capacity >= n) and sets its size to n. Returns the file's header (all its tokens).
// Throws Error naming the path and the mismatch.
KVFileHeader LoadKVFile(const std::string& path, KVCache& cache, const ModelIdentity& id,
                        int64_t n);
// The header alone (checked as above, the payload not read).
KVFileHeader ReadKVFileHeader(const std::string& path);

}  // namespace needle
