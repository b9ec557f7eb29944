#!/usr/bin/env bash
# Rebuild corpus/python-docs.jsonl.gz byte-identically: the reStructuredText sources of the Python 3.11
# documentation (PSF license, see LICENSE), one JSON object per document of >= 200 characters,
# {"id": path, "source": "python3.11-doc", "text": contents}, sorted by path, gzip with mtime 0 and no name.
#
#   corpus/build.sh                      # from Debian's python3.11-doc package (apt-get download; network)
#   corpus/build.sh ../shared/corpus/docs.jsonl.gz   # from that corpus's records with source "python3.11-doc"
#
# Both give the same bytes (checked with python3.11-doc 3.11.2-6+deb12u9 and zlib 1.2.13).
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/python-docs.jsonl.gz
if [[ $# -ge 1 ]]; then
    src=$(realpath "$1")
else
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    chmod 755 "$src"  # apt-get download runs as _apt when it can write there
    (cd "$src" && apt-get download -q python3.11-doc >/dev/null && dpkg -x python3.11-doc_*.deb py)
    src=$src/py
fi
python3 - "$src" "$out" <<'PY'
import gzip, json, pathlib, sys
src, out = pathlib.Path(sys.argv[1]), sys.argv[2]
if src.is_file():  # a docs.jsonl.gz: keep the Python documentation records, byte for byte
    with gzip.open(src, "rb") as f:
        lines = [line for line in f if json.loads(line)["source"] == "python3.11-doc"]
else:  # the unpacked Debian package
    lines = []
    for p in sorted(src.rglob("_sources/**/*.txt")):
        text = p.read_text("utf-8", "replace")
        if len(text) >= 200:
            doc = {"id": str(p.relative_to(src)), "source": "python3.11-doc", "text": text}
            lines.append((json.dumps(doc, ensure_ascii=False) + "\n").encode())
if not lines:
    sys.exit(f"no python3.11-doc documents found in {src}")
with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
    f.writelines(lines)
print(f"{out}: {len(lines)} documents, {sum(map(len, lines)):,} bytes of JSON lines")
PY
sha256sum "$out"
