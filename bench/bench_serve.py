#!/usr/bin/env python3
"""needle serve, measured as its users meet it (issue 20); standard library only.

ttft: one document, then questions about it. Each request is the document's token ids followed
  by a question's own ids (distinct per question), streamed with max_tokens 1; the time to its
  first chunk is its time to first token. The first question prefills the whole document; the
  later ones find it in the prefix cache (--prefix-cache) and prefill only their own tokens.
throughput: the samples of a JSONL file (`needle data TASK`), their "prompt" texts sent by N
  concurrent clients (greedy, max_tokens = the task's answer limit), against `needle eval TASK
  --data FILE --batch N` on the same samples: wall time of each, model loading excluded (eval is
  timed from its "samples at once" line to its end).

Usage:
  bench_serve.py ttft --needle BIN --model DIR [--doc-tokens 131072] [--questions 4]
      [--question-tokens 32] [-- SERVE_ARGS...]
  bench_serve.py throughput --needle BIN --model DIR --data FILE --task TASK --max-new N
      [--clients 8] [--serve-args "..."] [-- ARGS...]   (ARGS go to needle serve and eval)
Prints one JSON object a line.
"""
import argparse
import json
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


LOG_DIR = None  # --log: where serve.log and eval.log (each line with its time) are kept


def start_server(needle, model, args):
    """needle serve on a free port; returns (process, base URL) once it listens."""
    log = (open(LOG_DIR + "/serve.log", "w+") if LOG_DIR else
           tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False))
    p = subprocess.Popen([needle, "serve", "-m", model, "--port", "0"] + args,
                         stderr=log, stdout=subprocess.DEVNULL)
    for _ in range(6000):  # (loading a 7B model's dummy weights takes a while)
        text = open(log.name).read()
        m = re.search(r" on http://([0-9.]+):(\d+) ", text)
        if m:
            return p, "http://%s:%s" % (m.group(1), m.group(2))
        if p.poll() is not None:
            sys.exit("needle serve exited:\n" + text)
        time.sleep(0.1)
    p.kill()
    sys.exit("needle serve did not start:\n" + open(log.name).read())


def post(base, path, body, stream=False):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=3600)


def get(base, path):
    return json.load(urllib.request.urlopen(base + path, timeout=60))


def model_name(base):
    return get(base, "/v1/models")["data"][0]["id"]


def ttft(a, serve_args):
    p, base = start_server(a.needle, a.model, serve_args)
    try:
        name = model_name(base)
        vocab_hi = 4000  # (ids every tokenizer of these models holds)
        doc = [100 + (i * 7919) % (vocab_hi - 100) for i in range(a.doc_tokens)]
        for q in range(a.questions):
            ids = doc + [100 + (q * 131 + i * 17) % (vocab_hi - 100) for i in range(a.question_tokens)]
            before = get(base, "/health")["reused_prompt_tokens"]
            t0 = time.perf_counter()
            r = post(base, "/v1/completions",
                     {"model": name, "prompt": ids, "max_tokens": 1, "stream": True})
            first = None
            for line in r:
                if line.startswith(b"data: {") and first is None:
                    first = time.perf_counter() - t0
            r.close()
            # (the prompt joins the prefix cache at the step after its last token)
            time.sleep(0.5)
            reused = get(base, "/health")["reused_prompt_tokens"] - before
            print(json.dumps({"bench": "ttft", "question": q, "prompt_tokens": len(ids),
                              "reused_tokens": reused, "ttft_s": round(first, 4)}), flush=True)
    finally:
        p.terminate()
        p.wait()


def throughput(a, extra):
    samples = [json.loads(l) for l in open(a.data) if l.strip()]
    p, base = start_server(a.needle, a.model,
                           extra + a.serve_args.split() + ["--max-batch", str(a.clients)])
    try:
        name = model_name(base)
        work = queue.Queue()
        for s in samples:
            work.put(s["prompt"])
        tokens = [0, 0]
        lock = threading.Lock()

        def client():
            while True:
                try:
                    prompt = work.get_nowait()
                except queue.Empty:
                    return
                r = json.load(post(base, "/v1/completions",
                                   {"model": name, "prompt": prompt, "max_tokens": a.max_new,
                                    "temperature": 0}))
                with lock:
                    tokens[0] += r["usage"]["prompt_tokens"]
                    tokens[1] += r["usage"]["completion_tokens"]

        before = get(base, "/health")["reused_prompt_tokens"]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = time.perf_counter() - t0
        reused = get(base, "/health")["reused_prompt_tokens"] - before
    finally:
        p.terminate()
        p.wait()
    print(json.dumps({"bench": "throughput", "via": "serve", "clients": a.clients,
                      "samples": len(samples), "prompt_tokens": tokens[0],
                      "completion_tokens": tokens[1], "reused_prompt_tokens": reused,
                      "wall_s": round(served, 3)}), flush=True)
    with tempfile.TemporaryDirectory() as out:
        e = subprocess.Popen([a.needle, "eval", a.task, "-m", a.model, "--data", a.data, "--batch",
                              str(a.clients), "-o", out] + extra, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True)
        t0 = None
        reuse = ""
        elog = open(LOG_DIR + "/eval.log", "w") if LOG_DIR else None
        start = time.perf_counter()
        for line in e.stderr:
            if elog:
                elog.write("%.3f %s" % (time.perf_counter() - start, line))
            if t0 is None and "samples at once" in line:
                t0 = time.perf_counter()
            if "prefix reuse" in line:
                reuse = line.split("prefix reuse: ")[-1].strip()
        e.wait()
        if e.returncode != 0 or t0 is None:
            sys.exit("needle eval failed (%d)" % e.returncode)
        evaluated = time.perf_counter() - t0
    print(json.dumps({"bench": "throughput", "via": "eval", "batch": a.clients,
                      "samples": len(samples), "prefix_reuse": reuse, "wall_s": round(evaluated, 3),
                      "serve_over_eval": round(served / evaluated, 3)}), flush=True)


def main():
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=["ttft", "throughput"])
    ap.add_argument("--needle", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--doc-tokens", type=int, default=131072)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--data")
    ap.add_argument("--task")
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--serve-args", default="", help="throughput: arguments for needle serve alone")
    ap.add_argument("--log", help="keep serve.log and eval.log in this folder")
    a = ap.parse_args(argv)
    global LOG_DIR
    LOG_DIR = a.log
    if a.what == "ttft":
        ttft(a, rest)
    else:
        if not a.data or not a.task:
            sys.exit("throughput needs --data and --task")
        throughput(a, rest)


if __name__ == "__main__":
    main()
