#!/usr/bin/env bash
# needle's CUDA backend next to PyTorch on the same GPU, in one command (on the GPU machine):
#   bash bench/bench_cuda.sh BENCH_CUDA_BINARY [all|attn|e2e|gemv]
# e.g. LD_LIBRARY_PATH=$PWD/.dev/gpu/lib:/usr/local/cuda/lib64 bash bench/bench_cuda.sh .dev/gpu/bench_cuda
# Prints one table per benchmark with the ratio needle / PyTorch (times) or PyTorch / needle
# (rates), and keeps the raw lines in bench_cuda.jsonl and bench_torch.jsonl.
set -euo pipefail
BIN=${1:?usage: bench/bench_cuda.sh path/to/bench_cuda [all|attn|e2e]}
WHAT=${2:-all}
cd "$(dirname "$0")/.."
CONFIGS="bench/configs/qwen2.5-7b.json bench/configs/llama-3.1-8b.json"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$BIN" $WHAT $CONFIGS | tee bench_cuda.jsonl
python3 bench/bench_torch.py $WHAT $CONFIGS 2>/dev/null | tee bench_torch.jsonl
python3 - <<'PY'
import json
ours = [json.loads(l) for l in open("bench_cuda.jsonl")]
ref = [json.loads(l) for l in open("bench_torch.jsonl")]
bwr = next(r for r in ours if r["bench"] == "bandwidth")
bw = bwr["GB/s"]
def find(r, keys):
    for t in ref:
        if all(t.get(k) == r.get(k) for k in keys):
            return t
print(f"\ndevice bandwidth: {bwr['read_GB/s']:.0f} GB/s read-only kernel, {bwr['copy_GB/s']:.0f} GB/s D2D copy "
      f"(fractions below: of {bw:.0f}); empty launch in a graph: {bwr['empty_launch_us']:.2f} us")
print("\n| decode attention ctx | needle ms | torch ms | needle/torch | needle GB/s | needle of bandwidth | torch of bandwidth "
      "| read floor ms | needle of floor | needle / torch single call ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in ours:
    if r["bench"] == "attn_decode" and (t := find(r, ["bench", "ctx"])):
        print(f"| {r['ctx']} | {r['ms']:.4f} | {t['ms']:.4f} | {r['ms'] / t['ms']:.2f} | {r['GB/s']:.0f} | {r['of_bw']:.2f} | "
              f"{t['GB/s'] / bw:.2f} | {r['read_floor_ms']:.4f} | {r['read_floor_ms'] / r['ms']:.2f} | "
              f"{r['single_ms']:.4f} / {t['single_ms']:.4f} |")
print("\nDecode floors (no products; bench_decode_floors.cu), ms per call: copy-engine stream of the same tiles, "
      "with the block-table lookup (paged), paged + split merge through global memory (acq_rel arrival; sc: "
      "fenced), paged + merge through a cluster's shared memory with S splits per KV head (resident clusters)")
print("\n| ctx | needle ms | stream | paged | paged + merge (sc) | paged + merge | cluster merge, S: ms (resident clusters) |")
print("|---|---|---|---|---|---|---|")
for r in ours:
    if r["bench"] == "attn_decode" and "tma_paged_ms" in r:
        cl = [c for c in ours if c["bench"] == "decode_cluster_floor" and c["ctx"] == r["ctx"]]
        cs = ", ".join(f"{c['splits']}: {c['tma_paged_cluster_ms']:.4f} ({c['max_clusters']})" for c in cl)
        print(f"| {r['ctx']} | {r['ms']:.4f} | {r['tma_stream_ms']:.4f} | {r['tma_paged_ms']:.4f} | "
              f"{r['tma_paged_merge_sc_ms']:.4f} | {r['tma_paged_merge_ms']:.4f} | {cs} |")
print("\n| causal prefill T | needle kernel | needle ms | torch ms | needle/torch | needle TFLOP/s | torch TFLOP/s |")
print("|---|---|---|---|---|---|---|")
for r in ours:
    if r["bench"] == "attn_prefill" and (t := find(r, ["bench", "T"])):
        flops = 4.0 * 32 * 128 * r['T'] * (r['T'] + 1) / 2
        print(f"| {r['T']} | {r.get('kernel', '')} | {r['ms']:.2f} | {t['ms']:.2f} | {r['ms'] / t['ms']:.2f} | "
              f"{r['TFLOP/s']:.1f} | {flops / (t['ms'] * 1e-3) / 1e12:.1f} |")
print("\nDecode step in the backend's three modes (graph: the default; fused: same kernels launched; unfused: the "
      "operators one by one through cuBLAS), tok/s with the logits copied to the host, and greedy; of bound: the "
      "bandwidth bound (weights + K/V at the copy bandwidth) over the step's time")
print("\n| model | prompt | mode | ms | tok/s | greedy tok/s | of bound |")
print("|---|---|---|---|---|---|---|")
for r in ours:
    if r["bench"] == "e2e_decode":
        print(f"| {r['config']} | {r['prompt']} | {r['mode']} | {r['ms']:.3f} | {r['tok/s']:.1f} | "
              f"{r['greedy_tok/s']:.1f} | {r['of_bound']:.3f} |")
print("\n| model | op | tiling | us | of bandwidth |")
print("|---|---|---|---|---|")
for r in ours:
    if r["bench"] == "gemv":
        print(f"| {r['model']} | {r['op']} | {r['tiling']}{' (default)' if r['default'] else ''} | "
              f"{r['us']:.2f} | {r['of_bw']:.3f} |")
print("\n| model | prompt | needle prefill tok/s | transformers | needle/transformers time | needle decode tok/s | transformers | ")
print("|---|---|---|---|---|---|---|")
for r in ours:
    if r["bench"] == "e2e" and (t := find(r, ["bench", "config", "prompt"])):
        print(f"| {r['config']} | {r['prompt']} | {r['prefill_tok/s']:.0f} | {t['prefill_tok/s']:.0f} | "
              f"{t['prefill_tok/s'] / r['prefill_tok/s']:.2f} | {r['decode_tok/s']:.1f} | {t['decode_tok/s']:.1f} |")
PY
