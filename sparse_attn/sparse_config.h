// Settings of block-sparse attention, with their validation. Regions for a query at position p
// (B = block_size):
//   Initial  tokens [0, init_end), init_end = init_tokens rounded up to whole blocks;
//   Local    tokens [local_begin, p], local_begin = the block boundary at or below
//            p + 1 - local_window (so at least local_window tokens plus the current block);
//   Context  the whole blocks in between, scored through their representatives; the top `topk`
//            are attended.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

namespace needle {

enum class ReprType { kMax, kMean, kQuest, kDynamic };
enum class SelectMode { kLayer, kKVHead };

const char* ReprTypeName(ReprType r);
const char* SelectModeName(SelectMode m);
ReprType ParseReprType(const std::string& s, const std::string& what);
SelectMode ParseSelectMode(const std::string& s, const std::string& what);

struct SparseConfig {
  int64_t block_size = 128;
  int64_t init_tokens = 128;
  int64_t local_window = 4096;
  int64_t topk = 32;
  ReprType repr = ReprType::kQuest;
  int64_t repr_count = 4;    // Dynamic: tokens whose keys form the representative
  int64_t obs_window = 128;  // queries whose attention votes (Dynamic, preselection)
  SelectMode select = SelectMode::kKVHead;
  int64_t dense_layers = 2;      // the first layers attend to everything
  int64_t token_step = 1;        // reuse a selection for this many decode tokens
  int64_t layer_step = 1;        // ... and for this many consecutive layers
  int64_t preselect_blocks = 0;  // SnapKV-style candidate set at the end of prefill (0: off)
  int64_t preselect_pool = 7;    // max-pool width over token votes (odd)
  // Blocks kept in a KV head's next selection for the attention mass they took at its previous
  // step (block_mass.h): the heaviest, each followed by its successor; at most topk / 2 of the
  // topk, the rest chosen by score; the prompt's last query seeds them. 0: off.
  int64_t retain_blocks = 8;
  // Re-ranking (sparse_attn/best_key.h): the best rescore_blocks candidates by representative are
  // ranked again by their best single key, read from the cache, before the topk are taken
  // (selection in decode and in sparse prefill). 0: off; else at least topk.
  int64_t rescore_blocks = 0;
  // The same for the prompt's last query alone, which predicts the first answer token and seeds
  // retention for the decode steps (sparse prefill only: there it selects alone, where a dense
  // prefill's last query attends every key; ignored with a dense prefill, as prefill_chunk is).
  // One scan of the Context's keys a layer per prompt, so it can afford every block where
  // rescore_blocks, paid at every step and layer, cannot. 0: as rescore_blocks; else at least
  // topk, and the larger of the two counts. The default, 2^20, is every block of any context up
  // to 2^27 tokens at 128-token blocks: kv_retrieval at 32K and 64K went from 4/8 and 3/4 to 8/8
  // each with it (bench/RESULTS.md), at no measurable cost to prefill or decode.
  int64_t rescore_last = int64_t{1} << 20;
  // The re-ranking count of a query that selects alone at the prompt's end.
  int64_t RescoreLast() const { return std::max(rescore_blocks, rescore_last); }
  // Sparse chunked prefill (--prefill sparse): the prompt's queries attend in chunks of
  // prefill_chunk tokens, each chunk Initial + its own topk Context blocks (scored with the
  // chunk's queries) + the Local window before it + itself, causally; layers under
  // dense_layers attend densely only within the model's trained length (max_position_embeddings).
  // 512: the chunks every quality result was measured with (the CPU's 512-token micro-batches
  // cut 1024-token chunks there), and a divisor of both devices' default micro-batch.
  bool sparse_prefill = false;
  int64_t prefill_chunk = 512;
  // Block-wise position remapping (--pos-remap block, sparse_attn/plan.h AppendQuerySpans): each
  // sparse query scores its attended keys as if they were contiguous, so that no query-key
  // distance exceeds Initial + topk blocks + Local (+ the prefill chunk).
  bool pos_remap = false;
  // Placement, not selection (the hybrid engine only; the plan does not depend on it): the
  // percentage of each KV head's selected Context blocks that the GPU attends at least, reading
  // them from the host cache (pinned memory) over PCIe while the CPU attends the rest; blocks the
  // GPU attended at an earlier step and still holds are not read again, the CPU's are copied to
  // it in the background, and it attends more than the share where every head holds more of its
  // selection (engine/cuda/resident_blocks.h).
  // 0: the CPU attends them all. 50 measured best on the H200 machine without the block cache
  // (the GPU reads host blocks at about 30 GB/s, so a larger share left it the last to finish);
  // with the cache, 60: on two H100 hosts, Qwen2.5-7B 1M 83.7 / 85.0 / 88.1 tok/s against 80.4 /
  // 74.5 / 81.4 at 50, Llama-3.1-8B 512K 59.7 / 66.2 against 58.8 / 63.3 (75 was slower: 84
  // against 89; bench/RESULTS.md).
  int64_t gpu_share = 60;
  // Placement too: the extra GPU slots of a sparse layer (each one block of every KV head) that
  // hold the Context blocks the GPU attends, and keep them for later steps until a new block
  // needs the slot attended least recently. 0 (the default): sized where the sequence is made
  // (MakeSequenceAttention), up to kAutoGpuCacheShares steps' shares where the GPU budget has
  // room, at least ceil(gpu_share% of topk), one step's share. The synthetic 1M Qwen2.5-7B
  // hybrid on the H100 at share 50 (bench/RESULTS.md): 16 slots (one share) 80 tok/s, 35% of the
  // GPU's blocks already there; 64: 89, 74%; 128 and 256: 89.5, 79%.
  int64_t gpu_cache_blocks = 0;
  // Extra GPU slots a sparse layer has for the GPU's part: gpu_cache_blocks, at least
  // ceil(gpu_share% of topk).
  static constexpr int64_t kAutoGpuCacheShares = 4;
  // The same where the GPU plans host placement's steps (the default): it attends
  // every selected block its cache holds (no share), so a larger cache leaves the CPU fewer.
  // Qwen2.5-7B 1M on an H100 host, 26G: 80 / 160 / 320 slots held 54 / 68 / 73% of the selected
  // blocks, 80.5 / 87.2 / 85.6 tok/s; the host's own plans 81.9 / 77.5 / 78.9 (one process
  // each, bench/RESULTS.md).
  static constexpr int64_t kAutoGpuCacheSharesHostPlan = 8;
  int64_t GpuContextSlots() const {
    return std::max(gpu_cache_blocks, (gpu_share * topk + 99) / 100);
  }

  // Throws Error naming every setting involved when values cannot work (together).
  void Validate() const;
  int64_t retained() const { return std::min(retain_blocks, topk / 2); }  // effective count
  int64_t init_end() const { return (init_tokens + block_size - 1) / block_size * block_size; }
  // With pos_remap, blocks are scored where the remap puts them: representatives computed as if
  // each block started at position 0 (RepresentativeStore::ComputeFromKeys' relative_freq), and
  // the query rotated by RemapScoreShift(LocalBegin(p)) = topk * block_size / 2 - lb, i.e. to
  // W = (p - lb) + topk * block_size / 2 positions past every block's start: the distance of the
  // middle of the remapped Context (block i of k sits (k - i) * B + (p - lb) before the query).
  int64_t RemapScoreShift(int64_t lb) const { return topk * block_size / 2 - lb; }
  // First token of the Local region for a query at position p (>= init_end).
  int64_t LocalBegin(int64_t p) const {
    const int64_t lb = p + 1 - local_window;
    if (lb <= init_end()) return init_end();
    return lb / block_size * block_size;
  }
  std::string Describe() const;
  // How a prompt's KV is computed under these settings: "dense" (a dense prefill: the KV any
  // dense prefill of the same tokens computes), or the settings themselves (a sparse prefill).
  // A sequence may take a prefix's blocks only from a cache whose prefill has its key.
  std::string PrefillKey() const { return sparse_prefill ? Describe() : "dense"; }
  // The prefix of a prompt of `prompt` tokens that a sequence under these settings takes from a
  // cache holding `want` of its first tokens (a document prefilled once, a kept prompt, another
  // sequence's prompt of donor_prompt tokens), so that it then attends exactly as it does alone:
  // whole blocks; with Dynamic representatives or preselection, obs_window prompt queries left
  // to its own prefill (its observation window); with a sparse prefill, whole micro-batches
  // (ubatch) and prefill chunks (their boundaries, and so their selections, fall where they
  // fall alone), and not the donor's last prompt query (which selected alone).
  int64_t ShareablePrefix(int64_t want, int64_t prompt, int64_t donor_prompt, int64_t ubatch) const;
};

}  // namespace needle
