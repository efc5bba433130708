#!/usr/bin/env bash
# Builds one libFuzzer harness of fuzz/ (clang, ASan + UBSan) in build-fuzz/ and runs it for
# SECONDS (default 60) on its corpus (build-fuzz/corpus/HARNESS, seeded from the repository's
# fixtures), with the JSON dictionary. Findings go to build-fuzz/findings/HARNESS.
#   bash scripts/fuzz.sh config|generation_config|safetensors|tokenizer|data|predictions|results|chat|openai
#                        [SECONDS] [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
H=${1:?usage: scripts/fuzz.sh HARNESS [SECONDS] [JOBS]}
SECS=${2:-60}
JOBS=${3:-1}
B=build-fuzz
CXX=$(command -v clang++-14 || command -v clang++ || true)
[ -n "$CXX" ] || { echo "fuzz.sh: clang++ not found (apt-get install clang-14 libclang-rt-14-dev)" >&2; exit 1; }
if [ ! -f "$B/CMakeCache.txt" ]; then
  GEN=(); command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
  cmake -S . -B "$B" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" \
    -DNEEDLE_FUZZ=ON >&2
fi
cmake --build "$B" --target "fuzz_$H" -j "$(nproc)" >&2
CORPUS="$B/corpus/$H"
mkdir -p "$CORPUS" "$B/findings/$H"
F=tests/fixtures/models
case "$H" in
  config) for d in "$F"/*/; do cp -n "$d/config.json" "$CORPUS/$(basename "$d").json" 2>/dev/null || true; done ;;
  generation_config) for d in "$F"/*/; do [ -f "$d/generation_config.json" ] && cp -n "$d/generation_config.json" "$CORPUS/$(basename "$d").json"; done; true ;;
  safetensors) for d in "$F"/*/; do [ -f "$d/model.safetensors" ] && [ "$(stat -c %s "$d/model.safetensors")" -lt 200000 ] && cp -n "$d/model.safetensors" "$CORPUS/$(basename "$d").st"; done; true ;;
  tokenizer) cp -n tests/fixtures/tokenizer/bytes_tokenizer.json "$CORPUS/bytes.json"; cp -n models/needle-tiny/tokenizer.json "$CORPUS/needle-tiny.json" ;;
  data)
    printf '%s\n' '{"id": 3, "context": "The pass key is 123. Remember it.", "input": "What is the pass key?", "answer": ["123"], "depth": 0.5, "length": 4096}' > "$CORPUS/infinitebench.jsonl"
    printf '%s\n' '{"index": 7, "input": "Some text.", "answer_prefix": " Answer:", "outputs": ["o"], "length": 100}' > "$CORPUS/ruler.jsonl" ;;
  predictions)
    printf '%s\n' '{"prediction": "123", "answer": ["123"]}' '{"pred": "x", "label": "y"}' '{"pred": "1", "ground_truth": 1}' > "$CORPUS/preds.jsonl" ;;
  results)
    printf '%s\n' '{"config":"dense","task":"passkey","id":1,"length":100,"depth":0.5,"prompt_tokens":90,"prediction":"x","answer":["x"],"score":1,"prefill_tok_s":10.5,"decode_tok_s":3,"settings":"s","sample":"h","recall":0.9}' > "$CORPUS/predictions.jsonl"
    printf '%s\n' '{"index": 0, "count": 2, "task": "passkey", "samples": 6, "samples_hash": "a3984df8f648f24a"}' > "$CORPUS/shard.json" ;;
  chat)
    cp -n models/needle-tiny/tokenizer_config.json "$CORPUS/needle-tiny.json"
    printf '{"chat_template": "{{ bos_token }}<|start_header_id|>", "bos_token": "<s>", "eos_token": {"content": "</s>"}}\0system\0be brief\0user\0hi\0assistant\0hello\0user\0bye' > "$CORPUS/llama3.bin" ;;
  openai)
    printf '%s' '{"model":"m","prompt":"hi","max_tokens":7,"temperature":0.5,"stop":["a","bc"],"stream":true,"stream_options":{"include_usage":true},"seed":3}' > "$CORPUS/completion.json"
    printf '%s' '{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}],"max_completion_tokens":3,"logprobs":false}' > "$CORPUS/chat.json"
    printf '%s' '{"model":"m","prompt":[1,2,3],"n":1,"top_p":0.9,"top_k":4,"presence_penalty":0}' > "$CORPUS/ids.json" ;;
  *) echo "fuzz.sh: unknown harness '$H'" >&2; exit 1 ;;
esac
PAR=()
[ "$JOBS" -gt 1 ] && PAR=(-jobs="$JOBS" -workers="$JOBS")
# Parallel jobs write fuzz-N.log into the current folder: run in build-fuzz/logs/HARNESS.
R=$PWD
mkdir -p "$B/logs/$H" && cd "$B/logs/$H"
exec "$R/$B/fuzz/fuzz_$H" "$R/$CORPUS" -dict="$R/fuzz/json.dict" -max_total_time="$SECS" \
  "${PAR[@]}" -artifact_prefix="$R/$B/findings/$H/" -print_final_stats=1 -rss_limit_mb=4096 \
  -max_len=1048576
