#!/usr/bin/env python3
"""Writes a randomly initialised Hugging Face model folder of real size (e.g. Qwen2.5-7B shapes)
with transformers' save_pretrained, to measure needle's load time and decode speed on real
safetensors files. Runs where torch + transformers are installed (the GPU machine).

    python3 scripts/make_random_hf_model.py --config bench/configs/qwen2.5-7b.json --out /tmp/q7 \
        [--greedy-prompt 1,2,3 --greedy-new 8]

With --greedy-prompt it also prints transformers' greedy continuation (bf16, sdpa) for comparison.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--greedy-prompt", default="")
    ap.add_argument("--greedy-new", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(args.config, os.path.join(d, "config.json"))
        cfg = transformers.AutoConfig.from_pretrained(d)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    t1 = time.time()
    model.save_pretrained(args.out)
    t2 = time.time()
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"init {t1 - t0:.1f} s, save_pretrained {t2 - t1:.1f} s, {size / 1e9:.2f} GB in {args.out}", flush=True)
    if args.greedy_prompt:
        ids = torch.tensor([[int(x) for x in args.greedy_prompt.split(",")]], device=dev)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.greedy_new, do_sample=False)
        print("transformers greedy:", ",".join(str(int(x)) for x in out[0, ids.shape[1]:]), flush=True)


if __name__ == "__main__":
    main()
