// KV files (kvcache/kv_file.h): a cache written and loaded back holds the same bytes in every
// layer; a file whose model, KV type, block size, layout, header or payload differ, or that is
// truncated or not a KV file at all, is refused with a message naming the mismatch; a write
// replaces the file whole (a killed write leaves only a temporary name, never a file that loads).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/error.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_cache.h"
#include "kvcache/kv_file.h"
#include "sparse_attn/representatives.h"
#include "tests/test_util.h"

namespace needle {
namespace {

// The identity the files of these tests were computed by.
const ModelIdentity id{"00000000000000aa", "00000000000000bb"};

// A host cache of `n` tokens with random K and V rows.
void Fill(KVCache& c, int64_t n, int seed) {
  const KVCacheShape& s = c.shape();
  const size_t row = static_cast<size_t>(s.kv_heads * s.head_dim);
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::vector<float> k = test::RandomVector(row * n, seed + 2 * static_cast<int>(l));
    const std::vector<float> v = test::RandomVector(row * n, seed + 2 * static_cast<int>(l) + 1);
    c.AssignBlocks(l, 0, n);
    c.Write(l, 0, n, k.data(), v.data());
  }
  c.SetSize(n);
}

void ExpectSameRows(const KVCache& a, const KVCache& b, int64_t n) {
  const KVCacheShape& s = a.shape();
  for (int64_t l = 0; l < s.layers; ++l) {
    const KVLayerView x = a.Layer(l), y = b.Layer(l);
    for (int64_t h = 0; h < s.kv_heads; ++h)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < s.head_dim; ++d) {
          ASSERT_EQ(x.KAt(h, t, d), y.KAt(h, t, d)) << l << " " << h << " " << t << " " << d;
          ASSERT_EQ(x.VAt(h, t, d), y.VAt(h, t, d)) << l << " " << h << " " << t << " " << d;
        }
  }
}

std::string Refusal(const std::string& path, KVCache& c, const ModelIdentity& id, int64_t n) {
  try {
    LoadKVFile(path, c, id, n);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(KVFile, WrittenAndLoadedBackWholeOrByBlocks) {
  test::TempDir d;
  // (int8: each block's scales with it; the rows compared are the dequantised values)
  for (DType t : {DType::kF32, DType::kBF16, DType::kI8}) {
    const KVCacheShape shape(3, 2, 16, 64, 8, t);
    KVCache src(shape);
    Fill(src, 37, 5);
    std::vector<int32_t> ids(37);
    for (int i = 0; i < 37; ++i) ids[i] = 100 + i;
    const std::string f = d.File(std::string("a_") + DTypeName(t) + ".kv");
    SaveKVFile(f, src, ids, id);
    const KVFileHeader h = ReadKVFileHeader(f);
    EXPECT_EQ(h.tokens, ids);
    EXPECT_EQ(h.dtype, t);
    EXPECT_EQ(h.block_size, 8);
    // Whole, into a cache of a shared pool.
    BlockPool pool(KVCacheShape(3, 2, 16, 128, 8, t));
    KVCache all(pool, 64);
    LoadKVFile(f, all, id, 37);
    EXPECT_EQ(all.size(), 37);
    ExpectSameRows(all, src, 37);
    // Its first 4 blocks.
    KVCache part(pool, 40);
    LoadKVFile(f, part, id, 32);
    EXPECT_EQ(part.size(), 32);
    ExpectSameRows(part, src, 32);
    EXPECT_NE(Refusal(f, *std::make_unique<KVCache>(pool, 64), id, 30).find("whole blocks"),
              std::string::npos);
  }
}

// An extra section (a sparse planner's representatives) comes back with its name, meta and
// bytes; the representatives stored in it load into a store of the same kind as they were.
TEST(KVFile, ExtraSectionComesBackWithTheKV) {
  test::TempDir d;
  const KVCacheShape shape(2, 2, 16, 64, 8, DType::kF32);
  KVCache src(shape);
  Fill(src, 40, 9);
  RepresentativeStore reps(2, 2, 16, 5, ReprType::kQuest, DType::kF32);
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t b = 1; b < 5; b += 2) reps.ComputeFromKeys(l, b, src.Layer(l));
  const KVFileExtra extra{"representatives", "{\"repr\":\"quest\"}", reps.SaveBlocks(5)};
  const std::string f = d.File("x.kv");
  SaveKVFile(f, src, std::vector<int32_t>(40, 7), id, &extra);
  EXPECT_EQ(ReadKVFileHeader(f).extra.name, "representatives");
  BlockPool pool(KVCacheShape(2, 2, 16, 128, 8, DType::kF32));
  KVCache dst(pool, 40);
  const KVFileHeader h = LoadKVFile(f, dst, id, 40);
  ExpectSameRows(dst, src, 40);
  EXPECT_EQ(h.extra.meta, extra.meta);
  EXPECT_EQ(h.extra.bytes, extra.bytes);
  RepresentativeStore back(2, 2, 16, 5, ReprType::kQuest, DType::kF32);
  back.LoadBlocks(h.extra.bytes, 5, f);
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t b = 0; b < 5; ++b) {
      ASSERT_EQ(back.ready(l, b), reps.ready(l, b)) << l << " " << b;
      if (reps.ready(l, b)) {
        EXPECT_EQ(std::memcmp(back.Block(l, b), reps.Block(l, b), reps.BlockBytes()), 0);
      }
    }
  EXPECT_THROW(back.LoadBlocks(h.extra.bytes, 4, f), Error);  // (bytes of 5 blocks)
  // Without one, none.
  SaveKVFile(f, src, std::vector<int32_t>(40, 7), id);
  KVCache again(pool, 40);
  EXPECT_TRUE(LoadKVFile(f, again, id, 40).extra.name.empty());
}

TEST(KVFile, RefusesWhatDoesNotMatch) {
  test::TempDir d;
  const KVCacheShape shape(2, 2, 16, 64, 8, DType::kF32);
  KVCache src(shape);
  Fill(src, 20, 9);
  const std::string f = d.File("a.kv");
  SaveKVFile(f, src, std::vector<int32_t>(20, 7), id);
  const auto refused = [&](const std::string& path, const KVCacheShape& s, const ModelIdentity& m,
                           const std::string& want) {
    KVCache c(s);
    const std::string why = Refusal(path, c, m, 16);
    EXPECT_NE(why.find(want), std::string::npos) << "wanted '" << want << "', got: " << why;
    EXPECT_EQ(c.size(), 0);  // nothing loaded
  };
  refused(f, shape, {"00000000000000aa", "00000000000000cc"}, "computed by another model");
  refused(f, KVCacheShape(2, 2, 16, 64, 8, DType::kBF16), id, "a f32 KV cache; this run's is bf16");
  refused(f, KVCacheShape(2, 2, 16, 64, 16, DType::kF32), id, "block size 8; this run's is 16");
  refused(f, KVCacheShape(3, 2, 16, 64, 8, DType::kF32), id, "layout 2 layers");
  // Damaged: a payload byte, a header byte, the file cut short, not a KV file.
  std::string bytes;
  {
    std::ifstream in(f, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto write = [&](const std::string& name, const std::string& b) {
    std::ofstream(d.File(name), std::ios::binary) << b;
    return d.File(name);
  };
  std::string p = bytes;
  p[p.size() - 5] ^= 1;
  refused(write("p.kv", p), shape, id, "payload's checksum does not match");
  std::string h = bytes;
  h[40] ^= 1;
  refused(write("h.kv", h), shape, id, "header's checksum does not match");
  refused(write("t.kv", bytes.substr(0, bytes.size() - 100)), shape, id, "truncated");
  refused(write("n.kv", "not a kv file at all, just text"), shape, id, "not a needle KV file");
  refused(d.File("missing.kv"), shape, id, "missing.kv");
  // A write replaces the file whole; a temporary file left by a killed write does not load.
  KVCache other(shape);
  Fill(other, 20, 11);
  write("a.kv.tmp.12345", bytes.substr(0, 1000));
  SaveKVFile(f, other, std::vector<int32_t>(20, 8), id);
  KVCache c(shape);
  LoadKVFile(f, c, id, 20);
  ExpectSameRows(c, other, 20);
  EXPECT_EQ(ReadKVFileHeader(f).tokens, std::vector<int32_t>(20, 8));
  EXPECT_FALSE(std::filesystem::exists(f + ".tmp." + std::to_string(::getpid())));
  // An int8 file does not load into a bf16 cache.
  KVCache q(KVCacheShape(2, 2, 32, 64, 8, DType::kI8));
  Fill(q, 8, 1);
  SaveKVFile(d.File("q.kv"), q, std::vector<int32_t>(8, 1), id);
  KVCache b16(KVCacheShape(2, 2, 32, 64, 8, DType::kBF16));
  EXPECT_NE(Refusal(d.File("q.kv"), b16, id, 8).find("int8"), std::string::npos);
}

}  // namespace
}  // namespace needle
