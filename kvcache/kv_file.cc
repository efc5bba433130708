#include "kvcache/kv_file.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "engine/base/error.h"
#include "engine/base/json_parse.h"
#include "engine/base/mapped_file.h"

namespace needle {

namespace {

constexpr char kMagic[8] = {'N', 'E', 'E', 'D', 'L', 'E', 'K', 'V'};
constexpr uint32_t kVersion = 1;
constexpr size_t kPrefix = 32, kAlign = 4096;
// (int8: each block's data followed by its scales, [kv_head][block_size][head_dim / 32] floats)
const char* const kLayout = "blocks [layer][block][K then V][kv_head][block_size][head_dim]";

std::string Hex(uint64_t h) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(h));
  return b;
}

uint64_t HashFile(const std::string& path, XXH3_state_t* st) {
  MappedFile f(path);
  XXH3_64bits_update(st, f.data(), f.size());
  return f.size();
}

// The bytes of one block's scales (int8 caches; else 0), written after its data.
size_t BlockScaleBytes(const KVCache& c) {
  return c.shape().dtype == DType::kI8 ? c.pool().BlockScaleBytes() : 0;
}

// The blocks of the first `tokens` tokens, per layer.
int64_t Blocks(int64_t tokens, int64_t B) { return (tokens + B - 1) / B; }

void CheckShape(const std::string& path, const KVCacheShape& s) {
  if (!s.ring_layer.empty())
    for (uint8_t r : s.ring_layer)
      if (r != 0) Fail(path, ": KV files of a cache with ring layers are not supported");
}

}  // namespace

std::string ConfigHash(const std::string& dir) {
  const std::string cfg = std::filesystem::is_directory(dir) ? dir + "/config.json" : dir;
  const std::string text = ReadTextFile(cfg);
  return Hex(XXH3_64bits(text.data(), text.size()));
}

ModelIdentity IdentifyModel(const std::string& dir, bool dummy, const std::string& dummy_type) {
  namespace fs = std::filesystem;
  ModelIdentity id;
  const std::string cfg = fs::is_directory(dir) ? dir + "/config.json" : dir;
  id.config_hash = ConfigHash(cfg);
  if (dummy) {
    id.weights_hash = "dummy:" + dummy_type;
    return id;
  }
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(fs::path(cfg).parent_path()))
    if (e.is_regular_file() && e.path().extension() == ".safetensors")
      files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  if (files.empty()) Fail(dir, ": no .safetensors weights to identify the model by");
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  for (const auto& f : files) HashFile(f, st);
  id.weights_hash = Hex(XXH3_64bits_digest(st));
  XXH3_freeState(st);
  return id;
}

void SaveKVFile(const std::string& path, const KVCache& cache, const std::vector<int32_t>& tokens,
                const ModelIdentity& id, const KVFileExtra* extra) {
  const KVCacheShape& s = cache.shape();
  CheckShape(path, s);
  const int64_t n = static_cast<int64_t>(tokens.size()), B = s.block_size;
  if (n < 1 || n > cache.size())
    Fail(path, ": ", n, " tokens to write, the cache holds ", cache.size());
  const int64_t nb = Blocks(n, B);
  const size_t bd = cache.BlockBytes(), bs = BlockScaleBytes(cache), bb = bd + bs;
  KVMemory* mem = cache.pool().memory();
  // One pass over the blocks (each brought to the host once, through one buffer): the payload is
  // written at its offset and hashed as it goes, then the prefix and the header (whose length
  // does not depend on the hash: 16 hex digits) at the front.
  std::vector<uint8_t> buf(bb);
  const auto block = [&](int64_t l, int64_t b, bool v) -> const uint8_t* {
    const int32_t slot = cache.SlotOf(l, b);
    if (slot < 0) Fail(path, ": block ", b, " of layer ", l, " is not in the cache");
    const uint8_t* p = cache.BlockData(l, v, slot);
    const auto* sc = reinterpret_cast<const uint8_t*>(cache.pool().ScaleData(l, v, slot));
    if (mem == nullptr && bs == 0) return p;
    const auto get = [&](uint8_t* dst, const uint8_t* src, size_t bytes) {
      if (mem == nullptr)
        std::memcpy(dst, src, bytes);
      else
        mem->CopyToHost(dst, src, bytes);
    };
    get(buf.data(), p, bd);
    if (bs > 0) get(buf.data() + bd, sc, bs);
    return buf.data();
  };
  const auto header_of = [&](uint64_t payload_hash, uint64_t extra_hash) {
    nlohmann::json j{
        {"model", {{"config_xxh3", id.config_hash}, {"weights_xxh3", id.weights_hash}}},
        {"dtype", KVTypeName(s.dtype)},
        {"block_size", B},
        {"layers", s.layers},
        {"kv_heads", s.kv_heads},
        {"head_dim", s.head_dim},
        {"layout", kLayout},
        {"tokens", tokens},
        {"payload_bytes", static_cast<uint64_t>(2 * s.layers * nb) * bb},
        {"payload_xxh3", Hex(payload_hash)}};
    if (extra != nullptr)
      j["extra"] = {{"name", extra->name},
                    {"meta", extra->meta},
                    {"bytes", extra->bytes.size()},
                    {"xxh3", Hex(extra_hash)}};
    return j.dump();
  };
  const uint64_t offset = (kPrefix + header_of(0, 0).size() + kAlign - 1) / kAlign * kAlign;

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) Fail(tmp, ": cannot create: ", std::strerror(errno));
  const auto fail = [&](const char* what) {
    const int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    Fail(tmp, ": ", what, " failed: ", std::strerror(e));
  };
  const auto put = [&](const void* p, size_t bytes) {
    const auto* c = static_cast<const uint8_t*>(p);
    while (bytes > 0) {
      const ssize_t w = ::write(fd, c, bytes);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail("write");
      c += w, bytes -= static_cast<size_t>(w);
    }
  };
  if (::lseek(fd, static_cast<off_t>(offset), SEEK_SET) < 0) fail("seek");
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  for (int64_t l = 0; l < s.layers; ++l)
    for (int64_t b = 0; b < nb; ++b)
      for (bool v : {false, true}) {
        const uint8_t* p = block(l, b, v);
        XXH3_64bits_update(st, p, bb);
        put(p, bb);
      }
  const uint64_t payload_hash = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  uint64_t extra_hash = 0;
  if (extra != nullptr) {
    extra_hash = XXH3_64bits(extra->bytes.data(), extra->bytes.size());
    put(extra->bytes.data(), extra->bytes.size());
  }
  const std::string header = header_of(payload_hash, extra_hash);
  uint8_t prefix[kPrefix] = {};
  std::memcpy(prefix, kMagic, 8);
  const uint32_t hl = static_cast<uint32_t>(header.size());
  const uint64_t hh = XXH3_64bits(header.data(), header.size());
  std::memcpy(prefix + 8, &kVersion, 4);
  std::memcpy(prefix + 12, &hl, 4);
  std::memcpy(prefix + 16, &hh, 8);
  std::memcpy(prefix + 24, &offset, 8);
  if (::lseek(fd, 0, SEEK_SET) < 0) fail("seek");
  put(prefix, kPrefix);
  put(header.data(), header.size());
  const std::vector<uint8_t> pad(offset - kPrefix - header.size(), 0);
  put(pad.data(), pad.size());
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    Fail(tmp, ": cannot sync: ", std::strerror(e));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    Fail(path, ": cannot rename ", tmp, " to it: ", std::strerror(e));
  }
}

namespace {

// The checked header of a mapped file; payload: where its blocks begin; extra_bytes and
// extra_hash: its extra section's (after the payload), if any.
KVFileHeader Parse(const MappedFile& f, uint64_t* payload, uint64_t* payload_bytes,
                   std::string* payload_hash, uint64_t* extra_bytes, std::string* extra_hash) {
  const std::string& path = f.path();
  if (f.size() < kPrefix || std::memcmp(f.data(), kMagic, 8) != 0)
    Fail(path, ": not a needle KV file (no NEEDLEKV magic)");
  uint32_t version = 0, hl = 0;
  uint64_t hh = 0, offset = 0;
  std::memcpy(&version, f.data() + 8, 4);
  std::memcpy(&hl, f.data() + 12, 4);
  std::memcpy(&hh, f.data() + 16, 8);
  std::memcpy(&offset, f.data() + 24, 8);
  if (version != kVersion)
    Fail(path, ": KV file version ", version, "; this needle reads version ", kVersion);
  if (kPrefix + hl > f.size() || offset < kPrefix + hl || offset > f.size())
    Fail(path, ": truncated KV file (header of ", hl, " bytes, payload at ", offset, ", file of ",
         f.size(), " bytes)");
  if (XXH3_64bits(f.data() + kPrefix, hl) != hh)
    Fail(path, ": the header's checksum does not match");
  nlohmann::json j;
  try {
    j = ParseJsonBounded(std::string(reinterpret_cast<const char*>(f.data()) + kPrefix, hl));
    KVFileHeader h;
    h.model.config_hash = j.at("model").at("config_xxh3").get<std::string>();
    h.model.weights_hash = j.at("model").at("weights_xxh3").get<std::string>();
    h.dtype = ParseKVType(j.at("dtype").get<std::string>(), path + ": dtype");
    h.block_size = j.at("block_size").get<int64_t>();
    h.layers = j.at("layers").get<int64_t>();
    h.kv_heads = j.at("kv_heads").get<int64_t>();
    h.head_dim = j.at("head_dim").get<int64_t>();
    if (j.at("layout").get<std::string>() != kLayout)
      Fail(path, ": layout '", j.at("layout").get<std::string>(), "', not '", kLayout, "'");
    h.tokens = j.at("tokens").get<std::vector<int32_t>>();
    *payload_bytes = j.at("payload_bytes").get<uint64_t>();
    *payload_hash = j.at("payload_xxh3").get<std::string>();
    *payload = offset;
    *extra_bytes = 0;
    if (j.contains("extra")) {
      const nlohmann::json& x = j.at("extra");
      h.extra.name = x.at("name").get<std::string>();
      h.extra.meta = x.at("meta").get<std::string>();
      *extra_bytes = x.at("bytes").get<uint64_t>();
      *extra_hash = x.at("xxh3").get<std::string>();
    }
    if (h.tokens.empty() || h.block_size < 1 || h.layers < 1)
      Fail(path, ": a KV file of ", h.tokens.size(), " tokens, block size ", h.block_size);
    return h;
  } catch (const nlohmann::json::exception& e) {
    Fail(path, ": malformed KV file header: ", e.what());
  }
}

}  // namespace

KVFileHeader ReadKVFileHeader(const std::string& path) {
  MappedFile f(path);
  uint64_t payload = 0, bytes = 0, extra_bytes = 0;
  std::string hash, extra_hash;
  return Parse(f, &payload, &bytes, &hash, &extra_bytes, &extra_hash);
}

KVFileHeader LoadKVFile(const std::string& path, KVCache& cache, const ModelIdentity& id,
                        int64_t n) {
  MappedFile f(path);
  uint64_t payload = 0, bytes = 0, extra_bytes = 0;
  std::string hash, extra_hash;
  KVFileHeader h = Parse(f, &payload, &bytes, &hash, &extra_bytes, &extra_hash);
  const KVCacheShape& s = cache.shape();
  CheckShape(path, s);
  if (h.model.config_hash != id.config_hash || h.model.weights_hash != id.weights_hash)
    Fail(path, ": computed by another model (config ", h.model.config_hash, ", weights ",
         h.model.weights_hash, "; this model: config ", id.config_hash, ", weights ",
         id.weights_hash, ")");
  if (h.dtype != s.dtype)
    Fail(path, ": a ", KVTypeName(h.dtype), " KV cache; this run's is ", KVTypeName(s.dtype),
         " (--kv-type)");
  if (h.block_size != s.block_size)
    Fail(path, ": block size ", h.block_size, "; this run's is ", s.block_size, " (--block-size)");
  if (h.layers != s.layers || h.kv_heads != s.kv_heads || h.head_dim != s.head_dim)
    Fail(path, ": layout ", h.layers, " layers x ", h.kv_heads, " KV heads x ", h.head_dim,
         "; this model's is ", s.layers, " x ", s.kv_heads, " x ", s.head_dim);
  const int64_t T = static_cast<int64_t>(h.tokens.size()), B = s.block_size, nb = Blocks(T, B);
  const size_t bd = cache.BlockBytes(), bs = BlockScaleBytes(cache), bb = bd + bs;
  if (bytes != static_cast<uint64_t>(2 * s.layers * nb) * bb || payload + bytes > f.size())
    Fail(path, ": truncated or mis-sized payload (", bytes, " bytes at ", payload, ", file of ",
         f.size(), " bytes; ", T, " tokens need ", 2 * s.layers * nb * static_cast<int64_t>(bb),
         ")");
  if (Hex(XXH3_64bits(f.data() + payload, bytes)) != hash)
    Fail(path, ": the payload's checksum does not match (a damaged file)");
  if (!h.extra.name.empty()) {
    const uint64_t at = payload + bytes;
    if (extra_bytes > f.size() - at)
      Fail(path, ": truncated ", h.extra.name, " section (", extra_bytes, " bytes at ", at,
           ", file of ", f.size(), " bytes)");
    if (Hex(XXH3_64bits(f.data() + at, extra_bytes)) != extra_hash)
      Fail(path, ": the ", h.extra.name, " section's checksum does not match (a damaged file)");
    h.extra.bytes.assign(f.data() + at, f.data() + at + extra_bytes);
  }
  if (n < 0 || n > T || (n % B != 0 && n != T))
    Fail(path, ": cannot load ", n, " of its ", T, " tokens (whole blocks of ", B, ", or all)");
  if (cache.size() != 0 || cache.shape().capacity < n)
    Fail(path, ": loads into an empty cache of at least ", n, " tokens");
  KVMemory* mem = cache.pool().memory();
  const int64_t load = Blocks(n, B);
  for (int64_t l = 0; l < s.layers; ++l) {
    if (n > 0) cache.AssignBlocks(l, 0, n);
    for (int64_t b = 0; b < load; ++b)
      for (int v = 0; v < 2; ++v) {
        const uint8_t* src = f.data() + payload + ((l * nb + b) * 2 + v) * bb;
        const int32_t slot = cache.SlotOf(l, b);
        const auto put = [&](void* dst, const uint8_t* from, size_t bytes) {
          if (mem == nullptr)
            std::memcpy(dst, from, bytes);
          else
            mem->CopyFromHost(dst, from, bytes);
        };
        put(cache.BlockData(l, v != 0, slot), src, bd);
        if (bs > 0) put(cache.pool().ScaleData(l, v != 0, slot), src + bd, bs);
      }
  }
  cache.SetSize(n);
  return h;
}

}  // namespace needle
