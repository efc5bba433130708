#!/usr/bin/env python3
"""How much of each decode step's selection the step before already had, from --dump-plan.

The hybrid engine's GPU block cache (--gpu-cache-blocks) keeps the blocks of recent steps,
and the blocks the CPU attended are copied there in the background; a step's blocks that every
KV head holds are attended by the GPU, beyond --gpu-share (docs/ARCHITECTURE.md). How many that
is depends on how much the selection changes from step to step, which this reads from the plans
of any run (the CPU's sparse attention included: the plan is the same wherever the keys lie):

  needle generate -f doc.txt --attention sparse -n 64 --dump-plan plan.jsonl
  python3 scripts/plan_overlap.py plan.jsonl [--slots 64]

Per sparse layer: the candidates, the steps, and per step (averaged over steps) the blocks a KV
head shares with the step before (mean over heads, and the fewest of any head), and the fewest
of any head held by a cache of --slots blocks a head that keeps every selected block, the least
recently selected making way (what the fills give, up to the slots).
"""
import argparse
import collections
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plan", help="a --dump-plan file (JSON lines)")
    ap.add_argument("--slots", type=int, default=64, help="cache slots a layer and KV head")
    args = ap.parse_args()
    plans = collections.defaultdict(dict)  # layer -> step -> [kv_head][blocks]
    candidates = {}
    try:
        with open(args.plan, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{args.plan}:{n}: not JSON ({e.msg})")
                if d.get("dense", True) or "blocks" not in d:
                    continue
                if not isinstance(d["blocks"], list):
                    sys.exit(f"{args.plan}:{n}: field 'blocks' is not a list")
                plans[d["layer"]][d["step"]] = d["blocks"]
                candidates[d["layer"]] = d.get("candidates")
    except OSError as e:
        sys.exit(f"{args.plan}: {e.strerror}")
    if not plans:
        sys.exit(f"{args.plan}: no sparse decode steps (--dump-plan of a run with --attention sparse)")
    for layer in sorted(plans):
        steps = plans[layer]
        order = sorted(steps)
        heads = len(steps[order[0]])
        cache = [collections.OrderedDict() for _ in range(heads)]  # block -> None, LRU first
        mean, fewest, held = [], [], []
        for i, t in enumerate(order):
            cur = steps[t]
            if i > 0 and order[i - 1] == t - 1:
                prev = steps[t - 1]
                shared = [len(set(c) & set(p)) for c, p in zip(cur, prev)]
                mean.append(sum(shared) / len(shared))
                fewest.append(min(shared))
                held.append(min(sum(1 for b in c if b in cache[h]) for h, c in enumerate(cur)))
            for h, c in enumerate(cur):
                for b in c:
                    cache[h].pop(b, None)
                    cache[h][b] = None
                while len(cache[h]) > args.slots:
                    cache[h].popitem(last=False)
        topk = max(len(b) for b in steps[order[0]])
        avg = lambda v: sum(v) / len(v) if v else float("nan")
        print(f"layer {layer}: {candidates[layer]} candidates, {len(order)} steps, {topk} blocks a "
              f"head; shared with the step before {avg(mean):.1f} (fewest of any head "
              f"{avg(fewest):.1f}); held by {args.slots} slots, fewest of any head {avg(held):.1f}")


if __name__ == "__main__":
    main()
