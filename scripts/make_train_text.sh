#!/bin/bash
# Writes needle-tiny's training text to .dev/train (git-ignored, carried to the GPU machine):
#   jargon.txt  the Jargon File (Debian package jargon-text) without its box-drawing lines
#   words.json  WordNet adjectives and nouns (wordnet-base), filtered as datasets/ruler.cc does
set -euo pipefail
cd "$(dirname "$0")/.."
out=.dev/train
mkdir -p "$out"
zcat /usr/share/doc/jargon-text/jargon.txt.gz | grep -v "[│├─┤┌┐└┘┼]" > "$out/jargon.txt"
python3 - "$out/words.json" <<'PY'
import json, sys
def load(path):
    # Same rule as datasets/ruler.cc LoadWordLists: tagged in SemCor >= 3 times, a-z only, <= 10.
    out = []
    for line in open(path):
        if not line.strip() or line[0] == " ":
            continue
        p = line.split()
        rest = p[4 + int(p[3]):]
        if int(rest[1]) >= 3 and len(p[0]) <= 10 and all("a" <= c <= "z" for c in p[0]):
            out.append(p[0])
    return sorted(out)
json.dump({"adjectives": load("/usr/share/wordnet/index.adj"),
           "nouns": load("/usr/share/wordnet/index.noun")}, open(sys.argv[1], "w"))
PY
echo "wrote $out/jargon.txt and $out/words.json"
