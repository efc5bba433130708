#!/usr/bin/env bash
# Installs the client libraries that tests/clients/run.sh drives needle serve with: the official
# `openai` and `ollama` npm packages, pinned, into DIR/node_modules. Nothing is committed; without
# npm or a registry the test skips and says why.
# Usage: bash scripts/fetch_clients.sh DIR
set -euo pipefail
DIR="${1:?usage: fetch_clients.sh DIR}"
PACKAGES=(openai@6.49.0 ollama@0.6.4)  # (openai 7 needs Node 22; Debian 12 machines have 20)
if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_clients: npm not found; the client test will skip" >&2
  exit 0
fi
mkdir -p "$DIR"
have=1
for p in "${PACKAGES[@]}"; do
  name="${p%@*}" version="${p##*@}"
  f="$DIR/node_modules/$name/package.json"
  [ -f "$f" ] && grep -q "\"version\": \"$version\"" "$f" || have=0
done
[ "$have" = 1 ] && exit 0
[ -f "$DIR/package.json" ] || echo '{"private": true}' >"$DIR/package.json"
if ! (cd "$DIR" && timeout 300 npm install --no-audit --no-fund --ignore-scripts --silent \
        "${PACKAGES[@]}" >/dev/null 2>&1); then
  echo "fetch_clients: npm could not install ${PACKAGES[*]}; the client test will skip" >&2
fi
exit 0
