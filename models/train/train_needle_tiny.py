#!/usr/bin/env python3
"""needle-tiny: trains a small LlamaForCausalLM to retrieve through attention, on the evaluation
tasks' own formats (models/train/templates.py) filled with random content, mixed with plain text
and copies. Runs on the GPU machine (torch + transformers + tokenizers) and writes a Hugging Face
folder. models/needle-tiny (see its README.md) is two calls on one H100, 11.2 minutes of device
time in all:

    A="--text .dev/train/jargon.txt --words .dev/train/words.json --tie-embeddings --word-values \
       --copy-source words --needle-acts random --needle-places made-up --raw-needles --first-weight 5"
    python3 models/train/train_needle_tiny.py $A --out $OUT/stage1 --steps 6200 --seed 9008 \
        --task-weights kv_retrieval=4,niah_multikey_3=2 --check-n 0
    python3 models/train/train_needle_tiny.py $A --init $OUT/stage1 --out $OUT/needle-tiny --steps 3000 \
        --seed 9103 --short-phase 0 --lr 7e-4 --full-share 0.5 \
        --task-weights kv_retrieval=6,niah_multikey_3=2,niah_single_3=2 --check-n 0

(on a slower machine add --max-minutes 30: the default 8-minute safety stop would end a run
early). The options' defaults are the settings of the earlier runs in NOTES.md (v1-v5, stages
2-3), but not their data stream: those drew every batch from one random generator in one process.

.dev/train/jargon.txt is the Jargon File from Debian's jargon-text package without its
box-drawing lines, and words.json the WordNet adjectives and nouns that datasets/ruler.cc uses
(scripts/make_train_text.sh writes both). Batches are built by --workers processes; each is a
function of --seed and its step alone (needle's evaluation seed is 1 and its generators use other
streams), and the initial weights of --seed; GPU reductions may still differ in the last bits.
"""
import argparse
import copy
import json
import math
import multiprocessing
import os
import random
import sys
import time

import numpy
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import templates as T  # noqa: E402

TASKS = ["passkey", "number_string", "kv_retrieval", "niah_single_1", "niah_single_2",
         "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "needle"]
PLACES = ["San Francisco", "Lisbon", "Kyoto", "Oslo", "Cairo", "Lima", "Boston", "Prague", "Sydney",
          "Nairobi", "Montreal", "Hanoi", "Dublin", "Seville", "Quito", "Bergen"]
ACTS = ["eat a sandwich and sit in Dolores Park", "walk along the river", "visit the old library",
        "watch the sunset from the hill", "ride the tram to the harbour", "buy bread at the market",
        "swim in the cold lake", "read in the botanical garden", "climb the castle stairs",
        "drink tea by the fountain"]
# --needle-acts random: cities and made-up activities, none of them the evaluation needle's (San
# Francisco, a sandwich, Dolores Park), so that answering needs copying the needle, not recalling
# one of a few memorised activities.
CITIES = ["Lisbon", "Kyoto", "Oslo", "Cairo", "Lima", "Boston", "Prague", "Sydney", "Nairobi",
          "Montreal", "Hanoi", "Dublin", "Seville", "Quito", "Bergen", "Tallinn", "Porto", "Krakow",
          "Havana", "Lagos", "Mumbai", "Osaka", "Denver", "Vienna", "Reykjavik", "Santiago", "Tunis",
          "Hobart", "Glasgow", "Zagreb", "Bogota", "Manila", "Helsinki", "Marseille", "Chicago"]
VERBS = ["eat", "buy", "find", "paint", "carry", "read", "sell", "draw", "fold", "wash", "build",
         "cook", "share", "hide", "count", "fix", "photograph", "feed", "borrow", "polish"]
TOWN_ENDS = ["ton", "ville", "burg", " City", " Bay", "stad", "mouth", " Falls", "field", " Springs"]
SITES = ["Park", "Garden", "Square", "Market", "Harbour", "Library", "Hill", "Bridge", "Lake", "Street"]


class Gen:
    """Random training samples in the evaluation formats."""

    def __init__(self, rng, text, words, needle_acts="fixed", needle_places="cities", copy_source="vocab",
                 raw_needles=False, number_keys="uniform", values_in_order=False):
        self.rng, self.text, self.words, self.needle_acts = rng, text, words, needle_acts
        self.needle_places, self.copy_source, self.raw_needles = needle_places, copy_source, raw_needles
        self.number_keys, self.values_in_order = number_keys, values_in_order
        self.sentences = [s for s in " ".join(text.split()).replace(". ", ".\0").split("\0") if s]

    def with_rng(self, rng):
        """The same generator drawing from `rng` (the text is not split again)."""
        g = copy.copy(self)
        g.rng = rng
        return g

    def digits(self, n):
        return "".join(self.rng.choice("0123456789") for _ in range(n))

    def number_key(self):
        """number_string's 10 digits. "repeats": InfiniteBench's own (datasets/infinitebench.cc
        NumberStringKey): 5 random digits, then 5 times one of them doubled in place, so that the
        key has runs of one digit ("2488888888") whose length a copy must count."""
        if self.number_keys == "uniform":
            return self.digits(10)
        k = list(self.digits(5))
        for i in range(5):
            pos = self.rng.randint(0, 4 + i)
            k.insert(pos, k[pos])
        return "".join(k)

    def uuid(self):
        h = "%032x" % self.rng.getrandbits(128)
        h = h[:12] + "4" + h[13:16] + "89ab"[self.rng.randrange(4)] + h[17:]
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def value(self, kind):
        if kind == "numbers":
            return str(self.rng.randint(10**6, 10**7 - 1))
        if kind == "uuids":
            return self.uuid()
        return self.rng.choice(self.words["adjectives"]) + "-" + self.rng.choice(self.words["nouns"])

    def essay(self, chars):
        i = self.rng.randrange(len(self.sentences))
        out, n = [], 0
        while n < chars:
            out.append(self.sentences[i % len(self.sentences)])
            n += len(out[-1]) + 1
            i += 1
        return out

    def place(self):
        """A city of CITIES or, with --needle-places made-up, half the time a made-up town
        ("Cableton", "Pool Bay"): the answer must then copy the place from the question."""
        if self.needle_places == "cities" or self.rng.random() < 0.5:
            return self.rng.choice(CITIES)
        return self.rng.choice(self.words["nouns"]).capitalize() + self.rng.choice(TOWN_ENDS)

    def activity(self):
        """A made-up activity in one of three shapes, the first that of the evaluation needle."""
        r, w = self.rng, self.words
        v1, v2 = r.sample(VERBS, 2)
        n1, n2 = r.choice(w["nouns"]), r.choice(w["nouns"])
        place = r.choice(w["nouns"]).capitalize() + " " + r.choice(SITES)
        shape = r.randrange(3)
        if shape == 0:
            return f"{v1} a {n1} and sit in {place}"
        if shape == 1:
            return f"{v1} the {r.choice(w['adjectives'])} {n1}"
        return f"{v1} a {n1} and {v2} the {r.choice(w['adjectives'])} {n2} near {place}"

    def task(self, kind, chars, queries=1):
        """(prompt, answer) of task `kind` with about `chars` characters of context; with
        queries > 1, a list of (text, answer) pairs whose first is the evaluation format and the
        rest ask about other needles of the same context (denser supervision for training)."""
        r = self.rng
        if kind in ("passkey", "number_string"):
            key = self.digits(5) if kind == "passkey" else self.number_key()
            n = max(1, chars // len(T.NOISE_LINE))
            j = r.randint(0, n)
            needle = T.passkey_needle(key) if kind == "passkey" else T.number_string_needle(key)
            ctx = T.NOISE_LINE * j + needle + T.NOISE_LINE * (n - j)
            return T.infinitebench_prompt(kind, ctx, T.infinitebench_question(kind)), " " + key + "."
        if kind == "kv_retrieval":
            n = max(2, chars // 84)
            pairs = [(self.uuid(), self.uuid()) for _ in range(n)]
            qs = r.sample(range(n), min(n, queries))
            k, v = pairs[qs[0]]
            first = (T.infinitebench_prompt(kind, T.kv_context(pairs), T.kv_input(k)), v)
            if queries == 1:
                return first
            return [first] + [(T.kv_input(pairs[i][0]), pairs[i][1]) for i in qs[1:]]
        if kind == "needle":
            sents = self.essay(chars)
            if self.needle_acts == "fixed":
                place, act = r.choice(PLACES), r.choice(ACTS)
            else:
                place, act = self.place(), self.activity()
            needle = f"\nThe best thing to do in {place} is {act} on a sunny day.\n"
            if self.raw_needles and r.random() < 0.5:
                # The evaluation's haystack: the text as it is in its file (line breaks, indents),
                # the needle after a sentence's last period.
                t = self.text
                s = t.rfind("\n", 0, r.randrange(max(1, len(t) - chars))) + 1
                hay = t[s:s + chars]
                p = hay.rfind(".", 0, r.randint(0, len(hay))) + 1
                ctx = hay[:p] + needle + hay[p:]
            else:
                j = r.randint(0, len(sents))
                ctx = " ".join(sents[:j]) + needle + " ".join(sents[j:])
            q = f"What is the best thing to do in {place}?"
            return T.niah_prompt(ctx, q), f" The best thing to do in {place} is {act} on a sunny day."
        hay, key_t, val_t, nk, nv, nq = T.RULER_TASKS[kind]
        extra = queries - 1
        keys = []
        while len(keys) < max(nk, nq) + extra:
            k = self.value(key_t)
            if k not in keys:
                keys.append(k)
        vals = [[self.value(val_t) for _ in range(nv)] for _ in keys]
        needles = [T.ruler_needle(kind, k, v) for k, vs in zip(keys, vals) for v in vs]
        r.shuffle(needles)
        q = r.sample(range(len(keys) - extra), nq)
        if hay == "noise":
            lines = [T.NOISE_SENTENCE] * max(1, chars // 86)
        elif hay == "needle":
            lines = [T.ruler_needle(kind, self.value(key_t), self.value(val_t)) for _ in range(max(1, chars // 70))]
        else:
            lines = self.essay(chars)
        for nd in needles:
            lines.insert(r.randint(0, len(lines)), nd)
        if self.values_in_order and nv > 1:
            # A key's values in the order the context gives them (scoring takes any order; a
            # random one taught needle-tiny to repeat values it had found instead of the rest).
            at = {}
            for j, ln in enumerate(lines):
                at.setdefault(ln, j)
            for k, vs in zip(keys, vals):
                vs.sort(key=lambda v, k=k: at[T.ruler_needle(kind, k, v)])
        answer = [v for i in q for v in vals[i]]
        query = T.ruler_query([keys[i] for i in q])
        prompt = T.ruler_task_prompt(kind, ("\n" if hay != "essay" else " ").join(lines), query)
        first = (prompt + T.ruler_answer_prefix(kind, query), " " + ", ".join(answer) + ".")
        if queries == 1:
            return first
        more = []
        for i in range(len(keys) - extra, len(keys)):
            qi = T.ruler_task_prompt(kind, "", keys[i]).split("\n")[-1]  # the question line alone
            more.append(("\n" + qi + T.ruler_answer_prefix(kind, keys[i]), " " + ", ".join(vals[i]) + "."))
        return [first] + more

    def copy_tokens(self, L, vocab, tok=None):
        """Random tokens, then chunks of them again: the induction pattern, densely supervised.
        Returns (ids, labels) with the loss on the repeats but their unpredictable first tokens.
        copy_source "vocab": tokens drawn uniformly from the vocabulary (never learnt by v1-v5);
        "words": the tokens of random words (WordNet nouns and adjectives, towns, verbs), the
        tokens that copying a needle sentence needs."""
        n = L // 2
        if self.copy_source == "vocab":
            first = [self.rng.randrange(256, vocab) for _ in range(n)]
        else:
            pool = self.words["nouns"] + self.words["adjectives"] + VERBS + CITIES
            first = []
            while len(first) < n:
                first += tok.encode(" " + " ".join(self.rng.choice(pool) for _ in range(64))).ids
            first = first[:n]
        ids, labels = list(first), [-100] * n
        while len(ids) < L:
            m = self.rng.randint(6, 32)
            a = self.rng.randrange(n - m)
            chunk = first[a:a + m][:L - len(ids)]
            ids += chunk
            labels += [-100] + chunk[1:]
        return ids, labels

    def copy_text(self, chars):
        """Plain text with a span of it repeated much later: learnt only by looking back."""
        s = self.rng.randrange(max(1, len(self.text) - chars))
        t = self.text[s:s + chars]
        m = self.rng.randint(40, 400)
        a = self.rng.randrange(max(1, len(t) // 2))
        return t[:len(t) - m] + "\n" + t[a:a + m]


def train_tokenizer(text, gen, vocab):
    tok = Tokenizer(models.BPE())
    # Digits one by one, as Llama-3 and Qwen do in groups: copying a number is copying digits.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    corpus += ["".join(gen.task(TASKS[i % len(TASKS)], 1500)) for i in range(600)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--words", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=16384, help="final training length in tokens")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per step")
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=9001)
    ap.add_argument("--max-minutes", type=float, default=8.0,
                    help="safety stop: save and quit early (the step count then differs)")
    ap.add_argument("--init", default=None,
                    help="continue from this saved folder (its weights and tokenizer) instead of "
                         "starting from random weights and training a tokenizer")
    ap.add_argument("--task-weights", default="",
                    help="extra sampling weight of tasks, e.g. kv_retrieval=3,niah_single_3=3 "
                         "(default: all tasks alike)")
    ap.add_argument("--short-phase", type=float, default=0.3,
                    help="fraction of steps at 512 tokens; the length then doubles up to --seq "
                         "over as many steps again (0: mixed lengths from the start)")
    ap.add_argument("--copy-share", default="0.5,0.2",
                    help="share of random-token copy samples during the short phase, and after")
    ap.add_argument("--needle-acts", choices=("fixed", "random"), default="fixed",
                    help="classic-needle training sentences: fixed (v3: 16 places x 10 activities, "
                         "the evaluation's among them) or random (made-up activities, other cities)")
    ap.add_argument("--needle-places", choices=("cities", "made-up"), default="cities",
                    help="places of the random classic-needle sentences: 35 cities, or half of "
                         "them made-up towns")
    ap.add_argument("--copy-source", choices=("vocab", "words"), default="vocab",
                    help="tokens of the random-token copy samples: uniform over the vocabulary, "
                         "or the tokens of random words")
    ap.add_argument("--tie-embeddings", action="store_true",
                    help="from scratch: one matrix for the input embeddings and the LM head (copying "
                         "a token is then the model's easy direction; v1-v5 and stages 2-3 were untied)")
    ap.add_argument("--word-values", action="store_true",
                    help="add a training-only RULER-format task, niah_words, whose values are "
                         "WordNet adjective-noun pairs (the evaluation's RULER values are numbers "
                         "and UUIDs only): copying words in the needle format")
    ap.add_argument("--raw-needles", action="store_true",
                    help="half the classic-needle samples in the text as it is in its file, as the "
                         "evaluation's haystack is (otherwise sentences joined by single spaces)")
    ap.add_argument("--first-weight", type=float, default=1.0,
                    help="loss weight of each answer's first token against its others: the first "
                         "token is where a retrieval is decided, the rest is mostly copying")
    ap.add_argument("--number-keys", choices=("uniform", "repeats"), default="uniform",
                    help="number_string's keys: 10 uniform digits, or InfiniteBench's (runs of one "
                         "digit, as the evaluation draws them)")
    ap.add_argument("--values-in-order", action="store_true",
                    help="answers of several values of one key (niah_multivalue) in the order the "
                         "context gives them")
    ap.add_argument("--full-share", type=float, default=0.0,
                    help="share of samples 90-100%% of the step's length instead of 25-100%%: an "
                         "evaluation at the training length is otherwise at the edge of what was seen")
    ap.add_argument("--check-n", type=int, default=8,
                    help="samples per task and length of the greedy check after training (0: none)")
    ap.add_argument("--stop-step", type=int, default=None,
                    help="stop after this many steps (the learning-rate schedule still spans --steps)")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                    help="processes building batches; a batch is a function of --seed and its step "
                         "alone, so the data do not depend on this number")
    args = ap.parse_args()
    if args.word_values:
        T.RULER_TASKS["niah_words"] = ("essay", "words", "words", 1, 1, 1)
        TASKS.append("niah_words")
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    text = open(args.text, encoding="utf-8").read()
    gen = Gen(random.Random(args.seed), text, json.load(open(args.words)), args.needle_acts,
              args.needle_places, args.copy_source, args.raw_needles, args.number_keys,
              args.values_in_order)
    t_start = time.time()

    if args.init:
        tok = Tokenizer.from_file(os.path.join(args.init, "tokenizer.json"))
    else:
        tok = train_tokenizer(text, gen, 4096)
        print(f"tokenizer {time.time() - t_start:.0f}s", flush=True)
    eos = tok.token_to_id("<|endoftext|>")
    mix = list(TASKS)  # the task drawn for a sample: uniform over this list
    for item in filter(None, args.task_weights.split(",")):
        name, w = item.split("=")
        if name not in TASKS:
            raise SystemExit(f"--task-weights: unknown task {name!r} (tasks: {', '.join(TASKS)})")
        mix += [name] * (int(w) - 1)
    copy_a, copy_b = (float(x) for x in args.copy_share.split(","))
    ratio = calibrate(gen, tok, random.Random(args.seed + 1))
    _DATA.update(args=args, gen=gen, tok=tok, eos=eos, mix=mix, copy=(copy_a, copy_b), ratio=ratio, text=text)
    # Fork the batch builders before CUDA is initialised in this process.
    last = min(args.steps, args.stop_step or args.steps)
    pool = multiprocessing.get_context("fork").Pool(args.workers)
    batches = pool.imap(make_batch, range(last), chunksize=1)

    dev = "cuda"
    if args.init:
        model = transformers.LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(dev)
        if args.tie_embeddings and not model.config.tie_word_embeddings:
            raise SystemExit("--tie-embeddings: the --init model has untied embeddings")
        cfg = model.config
        print(f"continuing from {args.init}", flush=True)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=5,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4 * args.seq,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
            bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=args.tie_embeddings)
        model = transformers.LlamaForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, {args.workers} data workers", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    stats = {}
    t0, step, wait = time.time(), 0, 0.0
    ckpt = lambda: save(model, tok, cfg, args.out, eos)  # noqa: E731
    while step < last:
        if time.time() - t_start > args.max_minutes * 60:
            print(f"safety stop at step {step}", flush=True)
            break
        tw = time.time()
        ids, labels, kinds = next(batches)
        wait += time.time() - tw
        L = ids.shape[1]
        x = torch.from_numpy(ids).to(dev, non_blocking=True).long()
        y = torch.from_numpy(labels).to(dev, non_blocking=True).long()
        warm = min(1.0, (step + 1) / 150)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits[:, :-1].float()
        tgt = y[:, 1:]
        per_tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                    ignore_index=-100, reduction="none").view(tgt.shape)
        mask = (tgt != -100).float()
        first = mask * (y[:, :-1] == -100).float()  # the first token of each answer
        wmask = mask + (args.first_weight - 1.0) * first
        per_sample = (per_tok * wmask).sum(1) / wmask.sum(1).clamp(min=1)
        per_first = (per_tok * first).sum(1) / first.sum(1).clamp(min=1)
        loss = per_sample.mean()  # every sample counts the same, whatever its answer length
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, v, f in zip(kinds, per_sample.tolist(), per_first.tolist()):
            stats.setdefault(k, []).append(v)
            if k in ("kv_retrieval", "niah_multikey_3", "needle"):
                stats.setdefault(k + "^1", []).append(f)  # first answer tokens alone
        if step % 100 == 0 or step == args.steps - 1:
            per = " ".join(f"{k}={sum(v) / len(v):.2f}" for k, v in sorted(stats.items()))
            print(f"step {step} L {L} loss {loss.item():.3f} t {time.time() - t0:.0f}s wait {wait:.0f}s | {per}",
                  flush=True)
            stats = {}
        if step % 900 == 899:
            ckpt()
            quick_check(model, tok, eos, 1024, gen.with_rng(random.Random(step)), ratio,
                        kinds=("passkey", "kv_retrieval", "niah_single_2", "needle"), n=4, lengths=(1024,))
            model.train()
        step += 1
    pool.terminate()
    print(f"trained {step} steps in {time.time() - t0:.0f}s (waited {wait:.0f}s for data)", flush=True)
    ckpt()
    if args.check_n > 0:
        quick_check(model, tok, eos, args.seq, gen.with_rng(random.Random(10**6)), ratio, n=args.check_n)
    print(f"total {time.time() - t_start:.0f}s", flush=True)


# What the batch builders need; filled by main() before the worker processes are forked.
_DATA = {}


def calibrate(gen, tok, rng):
    """Characters per token of each sample kind, measured once on a few samples, so that a batch
    needs no state carried over from the batches before it."""
    saved, gen.rng = gen.rng, rng
    ratio = {}
    for kind in TASKS + ["text", "copy"]:
        chars, toks = 0, 0
        for _ in range(4):
            if kind == "text":
                s = rng.randrange(len(gen.text) - 8000)
                t = gen.text[s:s + 8000]
            elif kind == "copy":
                t = gen.copy_text(8000)
            else:
                t = "".join(gen.task(kind, 8000))
            chars, toks = chars + len(t), toks + len(tok.encode(t).ids)
        ratio[kind] = chars / toks
    gen.rng = saved
    return ratio


def length_at(step, rng):
    """Curriculum: 512 tokens for the first --short-phase of the steps (induction heads form
    there), doubling up to --seq over as many steps again, then mixed lengths."""
    args = _DATA["args"]
    A, p = args.short_phase, step / args.steps
    if p < A:
        return 512
    top = args.seq if p >= 2 * A else min(args.seq, int(512 * 2 ** ((p - A) / A * math.log2(args.seq / 512))))
    return top if rng.random() < 0.6 else rng.choice([s for s in (1024, 2048, 4096, 8192, args.seq) if s <= top] or [top])


def sample(kind, L, rng):
    """(ids, labels) of one sample no longer than L tokens."""
    d = _DATA
    gen, tok, text, ratio, eos, args = d["gen"], d["tok"], d["text"], d["ratio"], d["eos"], d["args"]
    target = int(rng.uniform(0.25, 1.0) * L)
    if args.full_share > 0 and rng.random() < args.full_share:
        target = int(rng.uniform(0.9, 1.0) * L)  # the longest lengths, where evaluation samples sit
    for _ in range(6):
        if kind == "copy_tokens":
            return gen.copy_tokens(target, 4096, tok)
        chars = int(target * ratio[kind] * 0.95)
        if kind == "text":
            s = rng.randrange(max(1, len(text) - chars))
            x = tok.encode(text[s:s + chars]).ids
            y = list(x)
        elif kind == "copy":
            x = tok.encode(gen.copy_text(chars)).ids
            y = list(x)
        else:
            multi = kind not in ("passkey", "number_string", "needle") and rng.random() < 0.5
            parts = gen.task(kind, chars, queries=8 if multi else 1)
            if not multi:
                parts = [parts]
            x, y = [], []
            for p, a in parts:
                pi, ai = tok.encode(p).ids, tok.encode(a).ids
                x += pi + ai
                y += [-100] * len(pi) + ai
            x, y = x + [eos], y + [eos]
        if len(x) <= L:
            return x, y
        target = int(target * 0.9)
    return x[:L], y[:L]


def make_batch(step):
    """The batch of one step, a function of (--seed, step) alone: (ids [B, L] int32, labels
    [B, L] int32 with -100 where no loss is taken, the kind of each sample)."""
    d = _DATA
    args = d["args"]
    rng = random.Random(args.seed * 1000003 + step)
    d["gen"].rng = rng
    L = length_at(step, rng)
    B = max(1, args.tokens // L)
    copy_a, copy_b = d["copy"]
    c = copy_a if step < args.short_phase * args.steps else copy_b  # share of pure induction data
    ids = numpy.full((B, L), d["eos"], dtype=numpy.int32)
    labels = numpy.full((B, L), -100, dtype=numpy.int32)
    kinds = []
    for b in range(B):
        u = rng.random()
        kind = "text" if u < 0.1 else "copy" if u < 0.15 else "copy_tokens" if u < 0.15 + c else rng.choice(d["mix"])
        x, y = sample(kind, L, rng)
        ids[b, :len(x)] = x
        labels[b, :len(y)] = y
        kinds.append(kind)
    return ids, labels, kinds


def save(model, tok, cfg, out, eos):
    os.makedirs(out, exist_ok=True)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, state_dict={k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()})
    tok.save(os.path.join(out, "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
               "bos_token": None, "add_bos_token": False, "model_max_length": cfg.max_position_embeddings},
              open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
    json.dump({"eos_token_id": eos, "bos_token_id": eos, "do_sample": False},
              open(os.path.join(out, "generation_config.json"), "w"), indent=2)


def quick_check(model, tok, eos, seq, g, ratio, n=8, lengths=None,
                kinds=("passkey", "kv_retrieval", "niah_single_1", "niah_single_3", "needle")):
    """Greedy accuracy on fresh samples (seed 10**6, not needle's), scored by substring."""
    model.eval()
    for kind in kinds:
        for L in lengths or (2048, seq):
            ok = 0
            for _ in range(n):
                chars = int(L * ratio[kind] * 0.9)
                while True:
                    p, a = g.task(kind, chars)
                    ids = tok.encode(p).ids
                    if len(ids) <= L - 40:
                        break
                    chars = int(chars * 0.9)
                x = torch.tensor([ids], device="cuda")
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model.generate(x, max_new_tokens=len(tok.encode(a).ids) + 2, do_sample=False,
                                         pad_token_id=eos)
                ok += a.strip(" .") in tok.decode(out[0, x.shape[1]:].tolist())
            print(f"check {kind} @{len(ids)} tokens: {ok}/{n}", flush=True)


if __name__ == "__main__":
    main()
