#!/usr/bin/env bash
# needle serve against the official client libraries (issue 20): starts `needle serve` on a free
# port with the bundled model, computes each prompt's answer with `needle generate` (greedy), and
# runs tests/clients/clients.mjs, which asks the server through the `openai` and `ollama` npm
# packages and compares. Exit 77 (skipped, with the reason) without Node or the packages
# (scripts/fetch_clients.sh installs them; it needs the npm registry).
# Usage: bash tests/clients/run.sh NEEDLE CLIENTS_DIR MODEL_DIR
set -euo pipefail
NEEDLE="$1" CLIENTS="$2" MODEL="$3"
skip() { echo "SKIPPED: $*"; exit 77; }
command -v node >/dev/null 2>&1 || skip "node is not installed"
for p in openai ollama; do
  [ -f "$CLIENTS/node_modules/$p/package.json" ] ||
    skip "the $p npm package is not in $CLIENTS (bash scripts/fetch_clients.sh $CLIENTS)"
done
work="$(mktemp -d)"
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
T=(-t 2)
# The prompts and their answers alone.
prompts=("The pass key is 48213. Remember it. The pass key is"
         "Once upon a time, in a small village by the sea,"
         "The grass is green. The sky is blue. The sun is"
         "Here is a list of fruits: apple, banana,")
lens=(10 12 9 14)
{
  echo '{"plain": ['
  for i in "${!prompts[@]}"; do
    "$NEEDLE" generate -m "$MODEL" "${T[@]}" -p "${prompts[$i]}" -n "${lens[$i]}" \
      >"$work/plain$i.txt" 2>"$work/gen.log" || { cat "$work/gen.log"; exit 1; }
    node -e 'const fs=require("fs");const [p,n,f]=process.argv.slice(1);
      const t=fs.readFileSync(f,"utf8");
      process.stdout.write(JSON.stringify({prompt:p,n:+n,text:t.endsWith("\n")?t.slice(0,-1):t}))' \
      "${prompts[$i]}" "${lens[$i]}" "$work/plain$i.txt"
    [ "$i" -lt $((${#prompts[@]} - 1)) ] && echo ','
  done
  echo '], "chat":'
  chat="What is the capital of France?"
  "$NEEDLE" generate -m "$MODEL" "${T[@]}" --chat -p "$chat" -n 11 >"$work/chat.txt" \
    2>"$work/gen.log" || { cat "$work/gen.log"; exit 1; }
  node -e 'const fs=require("fs");const [p,f]=process.argv.slice(1);
    const t=fs.readFileSync(f,"utf8");
    process.stdout.write(JSON.stringify({prompt:p,n:11,text:t.endsWith("\n")?t.slice(0,-1):t}))' \
    "$chat" "$work/chat.txt"
  family="$(node -e 'const c=require(process.argv[1]);process.stdout.write(c.model_type)' \
    "$(realpath "$MODEL")/config.json")"
  echo ", \"family\": \"$family\"}"
} >"$work/want.json"
name="$(basename "$(realpath "$MODEL")")"
"$NEEDLE" serve -m "$MODEL" "${T[@]}" --port 0 --max-batch 4 --ctx-size 2048 \
  2>"$work/serve.log" &
server_pid=$!
port=
for _ in $(seq 1 300); do
  port="$(sed -n 's|.* on http://127.0.0.1:\([0-9]*\) .*|\1|p' "$work/serve.log")"
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "needle serve did not start:"; cat "$work/serve.log"; exit 1; }
cp "$(dirname "$0")/clients.mjs" "$CLIENTS/clients.mjs"
echo "needle serve on port $port; clients: openai $(node -p "require('$CLIENTS/node_modules/openai/package.json').version"), ollama $(node -p "require('$CLIENTS/node_modules/ollama/package.json').version")"
(cd "$CLIENTS" && timeout 300 node clients.mjs "http://127.0.0.1:$port" "$name" "$work/want.json")
