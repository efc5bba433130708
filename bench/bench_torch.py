#!/usr/bin/env python3
"""PyTorch's numbers for the shapes of bench/bench_cuda.cc, one JSON object per line:
  attn_decode / attn_prefill: torch.nn.functional.scaled_dot_product_attention (bf16, 32 q heads,
      8 KV heads via enable_gqa, head_dim 128), median of CUDA-event-timed repetitions after a
      warm-up; decode as in bench_cuda.cc: per call, over the layers of a >= 512 MiB cache in turn,
      replayed from a CUDA graph (single_ms: one call alone);
  e2e: transformers with random bf16 weights in the shapes of the given config.json files, sdpa
      attention: prefill tok/s of a P-token prompt and decode tok/s of 16 cached steps after it.
  generate: transformers' batched `generate` (greedy, static cache: cache_implementation
      "static") with random bf16 weights, a batch of B prompts of P tokens: decode tok/s of all
      the sequences, from two runs of 8 and 40 new tokens (their difference: the prefill cancels).
Usage: python3 bench/bench_torch.py [attn|e2e|all] [config.json ...]   (GPU machine)
       python3 bench/bench_torch.py generate CONFIG P B1,B2,...
"""
import json
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(f, reps):
    f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        a.record()
        f()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


def graph_median_ms(f, reps):
    """Median time of one replay of a CUDA graph captured from f (warmed up on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        f()
    return median_ms(g.replay, reps)


def attention():
    H, Hk, D = 32, 8, 128
    for ctx in (4096, 16384, 65536, 131072, 262144, 1048576):
        # As bench_cuda.cc: the calls go to the layers of a >= 512 MiB cache in turn, from a graph.
        nbytes = 2 * (ctx + 1) * Hk * D * 2
        layers = max(2, -(-512 * 2**20 // nbytes))
        q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
        ks = [torch.randn(1, Hk, ctx + 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        vs = [torch.randn_like(k) for k in ks]
        def step():
            for k, v in zip(ks, vs):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        ms = graph_median_ms(step, 20) / layers
        single = median_ms(lambda: F.scaled_dot_product_attention(q, ks[0], vs[0], enable_gqa=True), 20)
        print(json.dumps({"bench": "attn_decode", "ctx": ctx, "layers": layers, "ms": ms,
                          "GB/s": nbytes / (ms * 1e-3) / 1e9, "single_ms": single}), flush=True)
        del ks, vs
    for T in (4096, 32768, 131072):
        q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hk, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                       5 if T >= 131072 else 11)
        print(json.dumps({"bench": "attn_prefill", "T": T, "ms": ms,
                          "TFLOP/s": 4 * H * D * T * (T + 1) / 2 / (ms * 1e-3) / 1e12}), flush=True)


def e2e(config):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(config)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").eval()
    for P in (4096, 32768, 131072):
        ids = (torch.arange(P, device="cuda") * 7919 % 30000 + 10)[None]
        with torch.no_grad():
            torch.cuda.synchronize()
            t0 = time.time()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            pre = time.time() - t0
            past = out.past_key_values
            tok = torch.tensor([[11]], device="cuda")
            out = model(input_ids=tok, past_key_values=past, use_cache=True)  # warm-up step
            past = out.past_key_values
            torch.cuda.synchronize()
            t0 = time.time()
            for _ in range(16):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
            torch.cuda.synchronize()
            dec = time.time() - t0
        print(json.dumps({"bench": "e2e", "config": config.split("/")[-1], "prompt": P,
                          "prefill_tok/s": P / pre, "decode_tok/s": 16 / dec}), flush=True)
        del past, out
        torch.cuda.empty_cache()


def generate(config, P, batches):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(config)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").eval()
    for B in batches:
        ids = (torch.arange(B * P, device="cuda").reshape(B, P) * 7919 % 30000 + 10)
        mask = torch.ones_like(ids)

        def run(n):
            torch.cuda.synchronize()
            t0 = time.time()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False,
                                     cache_implementation="static", pad_token_id=0)
            torch.cuda.synchronize()
            assert out.shape[1] == P + n, out.shape
            return time.time() - t0
        try:
            run(8)  # (warm-up: the static cache and its compiled shapes)
            t8, t40 = run(8), run(40)
            print(json.dumps({"bench": "hf_generate", "config": config.split("/")[-1],
                              "prompt": P, "batch": B, "decode_tok/s": B * 32 / (t40 - t8),
                              "step_ms": (t40 - t8) / 32 * 1e3}), flush=True)
        except Exception as e:  # (out of memory at the largest batches: said, not fatal)
            print(json.dumps({"bench": "hf_generate", "batch": B, "error": str(e)[:200]}),
                  flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        generate(sys.argv[2], int(sys.argv[3]), [int(b) for b in sys.argv[4].split(",")])
        sys.exit(0)
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("attn", "all"):
        attention()
    if what in ("e2e", "all"):
        for c in sys.argv[2:]:
            e2e(c)
