#!/usr/bin/env python3
"""needle-tiny, experiment v0: trains a small LlamaForCausalLM to retrieve through attention, with
the evaluation tasks' own formats (models/train/templates.py) filled with random content, mixed
with plain text for language modelling. Runs on the GPU machine (torch + transformers +
tokenizers), deterministic for a seed, and writes a Hugging Face folder:

    python3 models/train/train_needle_tiny.py --text .dev/train/jargon.txt --out /tmp/needle-tiny \
        --minutes 8 --seq 4096

The training seeds (--seed, default 9001 and up) are never the evaluation seeds (needle uses 1).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import templates as T  # noqa: E402


def rand_digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def rand_uuid(rng):
    h = "%032x" % rng.getrandbits(128)
    h = h[:12] + "4" + h[13:16] + "89ab"[rng.randrange(4)] + h[17:]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


WORDS = ["tart", "quiet", "brave", "eyebrow", "river", "lamp", "green", "silent", "copper", "window", "garden",
         "rapid", "pocket", "violet", "marble", "thunder", "gentle", "harbor", "crystal", "falcon"]


def rand_word_key(rng):
    return rng.choice(WORDS) + "-" + rng.choice(WORDS)


def sample_task(rng, text, budget_chars):
    """One (prompt, answer) pair of a random task, about budget_chars long."""
    kind = rng.choice(["passkey", "number_string", "kv", "ruler_noise", "ruler_needle", "niah"])
    if kind in ("passkey", "number_string"):
        key = rand_digits(rng, 5) if kind == "passkey" else rand_digits(rng, 10)
        n = max(1, budget_chars // len(T.NOISE_LINE))
        j = rng.randint(0, n)
        needle = T.passkey_needle(key) if kind == "passkey" else T.number_string_needle(key)
        ctx = T.NOISE_LINE * j + needle + T.NOISE_LINE * (n - j)
        return T.infinitebench_prompt(kind, ctx, T.infinitebench_question(kind)), " " + key + "."
    if kind == "kv":
        n = max(2, budget_chars // 80)
        pairs = [(rand_uuid(rng), rand_uuid(rng)) for _ in range(n)]
        k, v = pairs[rng.randrange(n)]
        return T.infinitebench_prompt("kv_retrieval", T.kv_context(pairs), T.kv_input(k)), v
    if kind in ("ruler_noise", "ruler_needle"):
        task = "niah_single_1" if kind == "ruler_noise" else rng.choice(["niah_multikey_2", "niah_multikey_3"])
        uu = task == "niah_multikey_3"
        key = rand_uuid(rng) if uu else rand_word_key(rng)
        value = rand_uuid(rng) if uu else str(rng.randint(10**6, 10**7 - 1))
        n = max(1, budget_chars // 100)
        if kind == "ruler_noise":
            lines = [T.NOISE_SENTENCE] * n
        else:
            lines = [T.ruler_needle(task, rand_uuid(rng) if uu else rand_word_key(rng),
                                    rand_uuid(rng) if uu else str(rng.randint(10**6, 10**7 - 1))) for _ in range(n)]
        lines.insert(rng.randint(0, n), T.ruler_needle(task, key, value))
        prompt = T.ruler_task_prompt(task, "\n".join(lines), key) + T.ruler_answer_prefix(task, key)
        return prompt, " " + value + "."
    # Classic needle with a random subject, in the essay text.
    start = rng.randrange(max(1, len(text) - budget_chars))
    hay = text[start:start + budget_chars]
    place = rng.choice(["San Francisco", "Lisbon", "Kyoto", "Oslo", "Cairo", "Lima"])
    act = rng.choice(["eat a sandwich and sit in Dolores Park", "walk along the river", "visit the old library",
                      "watch the sunset from the hill"])
    needle = f"\nThe best thing to do in {place} is {act} on a sunny day.\n"
    p = hay.rfind(". ", 0, rng.randint(0, len(hay))) + 2
    ctx = hay[:max(p, 0)] + needle + hay[max(p, 0):]
    return T.niah_prompt(ctx, f"What is the best thing to do in {place}?"), f" The best thing to do in {place} is {act} on a sunny day."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=9001)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    text = open(args.text, encoding="utf-8").read()

    # Tokenizer: byte-level BPE, 4096 entries, trained on the text and task samples.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    corpus += ["".join(sample_task(random.Random(i), text, 2000)) for i in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = tok.token_to_id("<|endoftext|>")

    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=16384, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                   bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    dev = "cuda"
    model = transformers.LlamaForCausalLM(cfg).to(dev)
    print("params", sum(p.numel() for p in model.parameters()) / 1e6, "M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def batch():
        ids, labels = [], []
        for _ in range(args.batch):
            if rng.random() < 0.2:  # plain text
                s = rng.randrange(max(1, len(text) - 5 * args.seq))
                x = tok.encode(text[s:s + 5 * args.seq]).ids[:args.seq]
                y = list(x)
            else:  # a task: loss on the answer only
                chars = int(rng.uniform(0.2, 1.0) * args.seq * 3)
                p, a = sample_task(rng, text, chars)
                pi, ai = tok.encode(p).ids, tok.encode(a).ids + [eos]
                room = args.seq - len(ai)
                if len(pi) > room:  # keep head and tail of the prompt
                    pi = pi[:room // 2] + pi[len(pi) - (room - room // 2):]
                x = pi + ai
                y = [-100] * len(pi) + ai
            x = x + [eos] * (args.seq - len(x))
            y = y + [-100] * (args.seq - len(y))
            ids.append(x[:args.seq])
            labels.append(y[:args.seq])
        return torch.tensor(ids, device=dev), torch.tensor(labels, device=dev)

    t0, step = time.time(), 0
    budget = args.minutes * 60
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x, y = batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} t {time.time() - t0:.0f}s", flush=True)
        step += 1

    # Quick check: greedy passkey accuracy at a few lengths (Python side; needle measures the rest).
    model.eval()
    for chars in (3000, 6000, 10000):
        ok = 0
        for i in range(20):
            r = random.Random(10**6 + i)
            key = rand_digits(r, 5)
            n = chars // len(T.NOISE_LINE)
            j = r.randint(0, n)
            ctx = T.NOISE_LINE * j + T.passkey_needle(key) + T.NOISE_LINE * (n - j)
            ids = torch.tensor([tok.encode(T.infinitebench_prompt("passkey", ctx, T.infinitebench_question("passkey"))).ids], device=dev)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=eos)
            ok += key in tok.decode(out[0, ids.shape[1]:].tolist())
        print(f"passkey @{ids.shape[1]} tokens: {ok}/20", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"},
              open(os.path.join(args.out, "tokenizer_config.json"), "w"))
    print("saved", args.out, "steps", step, flush=True)


if __name__ == "__main__":
    main()
