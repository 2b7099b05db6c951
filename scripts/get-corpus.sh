#!/usr/bin/env bash
# Builds a real English pretraining corpus from Debian packages (apt-get only; no web downloads).
#
#   scripts/get-corpus.sh [--quick] [--out DIR] [--jobs N]
#
# Full: ~60 packages (literature, Bibles and commentaries, dictionaries, fortunes, technical manuals,
# man and info pages), ~150 MB of text, ~35 M tokens with a 16k BPE (docs/data.md, "The corpus").
# --quick: the small prose-only subset (two Bibles, a commentary, a hacker-culture book, two
# dictionaries, fortunes): ~14 MB of text, ~3.4 M tokens (16k BPE), a few CPU minutes. (The Matthew
# Henry commentary is full-build only: its 780k raw paragraphs, mostly duplicates and verse
# references, took 35 of the 48 wall minutes of a quick build on a busy 2-core machine.)
#
# Data packages are fetched with `apt-get download` and unpacked into DIR/stage (dpkg-deb -x):
# nothing of them is installed on the system. Only the tools are installed: mod2imp (libsword-utils),
# groff, Rscript (r-base-core, full build only), python3, zstd. The text comes out of
# scripts/corpus_build.py: fixed source order, sorted file lists, exact-duplicate removal, an
# English-prose filter; the same Debian release gives the same bytes (DIR/corpus.txt.json records
# the sha256 and per-source counts).
#
# Output: DIR/corpus.txt (one paragraph per line, a blank line between documents) and its manifest.
# Then:  nha tokenizer train --input DIR/corpus.txt --vocab 16000 --out DIR/tok.model
#        nha prepare --tokenizer DIR/tok.model --input DIR/corpus.txt --out DIR/shards
set -euo pipefail

quick=0
out=data/corpus
jobs=$(nproc 2>/dev/null || echo 2)
while (( $# )); do
  case "$1" in
    --quick) quick=1 ;;
    --out) out="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "get-corpus: unknown argument '$1'. HINT: --quick, --out DIR, --jobs N" >&2; exit 2 ;;
  esac
  shift
done
here=$(cd "$(dirname "$0")" && pwd)

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "get-corpus: needs root or sudo for apt-get install" >&2; exit 1; }
  sudo="sudo"
fi

# Sources (docs/data.md, "The corpus"). Quick: prose only, small downloads.
quick_pkgs=(sword-text-web sword-text-kjv sword-comm-scofield cfi-en dict-devil
            dict-jargon fortunes fortunes-min fortune-anarchism)
full_pkgs=(r-cran-janeaustenr r-cran-tokenizers sword-comm-tdavid sword-comm-mhcc
           linux-doc-6.1 python3.11-doc postgresql-doc-15 python-django-doc rust-doc git-doc
           apache2-doc libreoffice-help-en-us gimp-help-en gnome-user-docs r-doc-html bash-doc
           sphinx-doc debian-handbook debian-reference-en manpages manpages-dev perl-doc
           dict-gcide dict-wn dict-foldoc openjdk-17-doc qtbase5-doc-html)
tools=(python3 libsword-utils groff-base zstd)
pkgs=("${quick_pkgs[@]}")
if (( ! quick )); then
  pkgs+=("${full_pkgs[@]}")
  tools+=(r-base-core)
fi

start=$(date +%s)
echo "get-corpus: apt-get update"
$sudo apt-get update -q
missing=()
for t in "${tools[@]}"; do dpkg -s "$t" >/dev/null 2>&1 || missing+=("$t"); done
if (( ${#missing[@]} )); then
  echo "get-corpus: installing tools: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

mkdir -p "$out/stage/debs" "$out/stage/root"
out=$(cd "$out" && pwd)
echo "get-corpus: downloading ${#pkgs[@]} packages into $out/stage/debs"
# apt-get download writes into the current directory; as root it warns that the download is not
# sandboxed (the _apt user cannot write here), which is harmless.
( cd "$out/stage/debs" && apt-get download -q "${pkgs[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true )
for p in "${pkgs[@]}"; do
  ls "$out/stage/debs/${p}"_*.deb >/dev/null 2>&1 || echo "get-corpus: WARNING: package $p was not downloaded (not in this release?)" >&2
done
echo "get-corpus: unpacking"
for deb in "$out"/stage/debs/*.deb; do dpkg-deb -x "$deb" "$out/stage/root"; done

args=(--root "$out/stage/root" --out "$out/corpus.txt" --jobs "$jobs")
(( quick )) && args+=(--quick)
python3 "$here/corpus_build.py" "${args[@]}"

end=$(date +%s)
echo "get-corpus: done in $((end - start)) s: $out/corpus.txt ($(du -h "$out/corpus.txt" | cut -f1))"
echo "get-corpus: the unpacked packages in $out/stage can be deleted (rm -rf $out/stage)"
