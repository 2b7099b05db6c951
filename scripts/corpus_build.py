#!/usr/bin/env python3
"""Builds the English pretraining corpus from extracted Debian packages (stdlib only).

Called by scripts/get-corpus.sh, which downloads the packages and unpacks them under --root.
Output: one paragraph per line, one blank line between documents (what `nha prepare`'s default
paragraph mode reads), plus a JSON manifest with per-source counts.

Rules (docs/data.md, "The corpus"): per source, extract text (SWORD modules through mod2imp, dictd
files, fortunes, HTML pages, man pages through groff, info pages, R data through Rscript), keep
English prose paragraphs (prose_ok), drop exact duplicate paragraphs (first occurrence wins, within
and across sources), in a fixed source order over sorted file lists: the same packages give the
same bytes.
"""
import argparse
import glob
import gzip
import hashlib
import html
import html.parser
import json
import os
import re
import subprocess
import sys
import time
from multiprocessing import Pool

# ---- the prose filter ----------------------------------------------------------------------------

FUNCTION_WORDS = set("""a about above after again against all also am an and any are as at be
because been before being below between both but by can could did do does doing down during each
few for from further had has have having he her here hers herself him himself his how i if in into
is it its itself just may me might more most must my myself no nor not now of off on once only or
other our ours ourselves out over own same shall she should so some such than that the their
theirs them themselves then there these they this those through to too under until up upon very
was we were what when where which while who whom why will with would you your yours yourself
yourselves thee thou thy unto""".split())
CODE_SYMBOLS = set("{}[]<>=;|\\$#@^~`_")
URL_RE = re.compile(r"\S*(?:://|www\.)\S*")
WORD_RE = re.compile(r"[A-Za-z']+")


def prose_ok(par):
    """>= 8 words, >= 75% letters/spaces, <= 2% code symbols, >= 12% function words,
    almost no non-Latin script, <= 20% URL text."""
    words = par.split()
    if len(words) < 8:
        return False
    n = len(par)
    letters = sum(1 for c in par if c.isalpha() or c == " ")
    if letters < 0.75 * n:
        return False
    if sum(1 for c in par if c in CODE_SYMBOLS) > 0.02 * n:
        return False
    # Latin letters go up to U+024F; general punctuation (dashes, quotes) is fine.
    non_latin = sum(1 for c in par if c.isalpha() and ord(c) > 0x24F)
    if non_latin > 0.01 * n:
        return False
    if sum(len(m) for m in URL_RE.findall(par)) > 0.2 * n:
        return False
    lowered = [w.lower().strip("'") for w in WORD_RE.findall(par)]
    if sum(1 for w in lowered if w in FUNCTION_WORDS) < 0.12 * len(words):
        return False
    return True


def clean(text):
    """Whitespace runs to one space; control characters dropped."""
    text = "".join(c if (c >= " " or c in "\t\n") else " " for c in text)
    return " ".join(text.split())


# ---- extractors: each yields documents, a document being a list of paragraphs -------------------

def files_under(root, pattern):
    return sorted(glob.glob(os.path.join(root, pattern), recursive=True))


# SWORD modules (Bibles, commentaries) through mod2imp: "$$$Book C:V" then the entry's markup.
KEY_RE = re.compile(r"^(.*?)\s+(\d+):(\d+)$")
NOTE_RE = re.compile(r"<note\b.*?</note>", re.S | re.I)
PARA_TAG_RE = re.compile(r"<(?:p|/p|br|lb|div|/div)\b[^>]*>", re.I)
TAG_RE = re.compile(r"<[^>]*>")


def find_module(root, pattern):
    """The SWORD module whose mods.d/*.conf name or [Section] contains `pattern` (module names
    change between releases: engWEB2015eb, engKJV2006eb, MHCC, ...)."""
    for conf in files_under(root, "usr/share/sword/mods.d/*.conf"):
        with open(conf, encoding="utf-8", errors="replace") as f:
            m = re.search(r"^\[([^\]]+)\]", f.read(), re.M)
        if m and (pattern in m.group(1).lower() or pattern in os.path.basename(conf).lower()):
            return m.group(1)
    raise OSError(f"no SWORD module matching '{pattern}' under {root}/usr/share/sword/mods.d")


TITLE_RE = re.compile(r"<title\b.*?</title>", re.S | re.I)


def sword(root, pattern, bible):
    module = find_module(root, pattern)
    env = dict(os.environ, SWORD_PATH=os.path.join(root, "usr/share/sword"), HOME="/nonexistent")
    out = subprocess.run(["mod2imp", module], env=env, capture_output=True, check=True).stdout
    text = out.decode("utf-8", "replace")
    docs, current_key, paragraphs = [], None, []
    chapter_verses = []

    def flush_chapter():
        if chapter_verses:
            paragraphs.append(clean(" ".join(chapter_verses)))
            chapter_verses.clear()

    for entry in text.split("$$$")[1:]:
        key, _, body = entry.partition("\n")
        m = KEY_RE.match(key.strip())
        doc_key = (m.group(1), m.group(2)) if m else ("intro", "0")
        if doc_key != current_key:
            flush_chapter()
            if paragraphs:
                docs.append(paragraphs)
            paragraphs, current_key = [], doc_key
        body = NOTE_RE.sub(" ", body)
        body = TITLE_RE.sub(" ", body)
        if bible:  # a chapter's verses make one paragraph
            verse = clean(html.unescape(TAG_RE.sub(" ", body)))
            if verse:
                chapter_verses.append(verse)
        else:  # commentary: paragraph tags split an entry
            for part in PARA_TAG_RE.split(body):
                par = clean(html.unescape(TAG_RE.sub(" ", part)))
                if par:
                    paragraphs.append(par)
    flush_chapter()
    if paragraphs:
        docs.append(paragraphs)
    yield from docs


# dictd databases: *.index lines "headword TAB offset TAB length" (base64) into the *.dict(.dz).
B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def b64num(s):
    n = 0
    for c in s:
        n = n * 64 + B64[c]
    return n


def dictd(root, name):
    base = os.path.join(root, "usr/share/dictd", name)
    data_path = base + ".dict.dz" if os.path.exists(base + ".dict.dz") else base + ".dict"
    opener = gzip.open if data_path.endswith(".dz") else open
    with opener(data_path, "rb") as f:
        data = f.read()
    entries = []
    with open(base + ".index", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
                continue
            entries.append((b64num(parts[1]), b64num(parts[2])))
    seen = set()
    for off, length in sorted(entries):  # file order; one entry per document
        if off in seen:
            continue
        seen.add(off)
        body = data[off:off + length].decode("utf-8", "replace")
        pars = [clean(p) for p in re.split(r"\n\s*\n", body)]
        pars = [p for p in pars if p]
        if pars:
            yield pars


# fortune files: fortunes separated by "%" lines; skip the Portuguese mario.* files and ASCII art.
def fortunes(root):
    for path in files_under(root, "usr/share/games/fortunes/**/*"):
        name = os.path.basename(path)
        if os.path.isdir(path) or os.path.islink(path) or name.endswith((".dat", ".u8")) or \
                name.startswith("mario."):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        pars = []
        for cookie in re.split(r"\n%\n", text):
            art = sum(1 for c in cookie if not (c.isalnum() or c.isspace() or c in ".,;:'\"!?-()"))
            if not cookie.strip() or art > 0.1 * len(cookie):
                continue
            pars.append(clean(cookie))
        if pars:
            yield pars


# HTML pages: text of block elements, without navigation, code and boilerplate.
SKIP_TAGS = {"pre", "script", "style", "nav", "header", "footer", "head", "noscript", "svg", "math",
             "form", "button", "select", "textarea", "code-block", "table"}
BLOCK_TAGS = {"p", "li", "dd", "dt", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
              "section", "article", "td", "th", "tr", "caption", "figcaption", "br", "ul", "ol",
              "dl", "body", "main", "aside"}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed", "source",
             "track", "wbr", "param"}
SKIP_CLASS_RE = re.compile(r"sidebar|toc|toctree|navigation|navbar|\bnav\b|menu|breadcrumb|footer|"
                           r"header|related|search|headerlink|copyright|admonition-title", re.I)


class TextExtractor(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []       # (tag, skipping)
        self.skip_depth = 0
        self.buf = []
        self.paragraphs = []

    def flush(self):
        par = clean("".join(self.buf))
        if par:
            self.paragraphs.append(par)
        self.buf = []

    def handle_starttag(self, tag, attrs):
        if tag in BLOCK_TAGS:
            self.flush()
        if tag in VOID_TAGS:
            return
        cls = " ".join(v or "" for k, v in attrs if k in ("class", "id", "role"))
        skipping = tag in SKIP_TAGS or bool(cls and SKIP_CLASS_RE.search(cls))
        self.stack.append((tag, skipping))
        if skipping:
            self.skip_depth += 1

    def handle_endtag(self, tag):
        if tag in BLOCK_TAGS:
            self.flush()
        if not any(t == tag for t, _ in self.stack):
            return  # stray end tag
        while self.stack:  # closes unclosed children too (<p> without </p>)
            t, skipping = self.stack.pop()
            if skipping:
                self.skip_depth -= 1
            if t == tag:
                break

    def handle_data(self, data):
        if self.skip_depth == 0:
            self.buf.append(data)


def html_page(path):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    parser = TextExtractor()
    try:
        parser.feed(raw.decode("utf-8", "replace"))
        parser.close()
    except Exception:  # a broken page is skipped, not fatal
        return []
    parser.flush()
    return parser.paragraphs


LANGS = set("""ar ast be bg bn bs ca cs cy da de el eo es et eu fa fi fr ga gl gu he hi hr hu hy id
is it ja ka kk km kn ko ku lt lv mk ml mn mr ms nb ne nl nn oc pa pl pt pt_BR pt-BR pt-br ro ru si
sk sl sq sr sv ta te tg th tr ug uk ur uz vi zh zh_CN zh-CN zh-cn zh_TW zh-TW zh-tw zh_HK
translations""".split())
SKIP_PAGE_RE = re.compile(r"(^|/)(genindex|search|py-modindex|modindex|print|searchindex|"
                          r"index-\w+|objects)\.html?(\.gz)?$|/_(sources|static|images|modules)/")


def english_html(path):
    parts = path.split("/")
    if any(p in LANGS for p in parts[:-1]):
        return False
    m = re.search(r"\.([A-Za-z_-]+)\.html?(\.gz)?$", parts[-1])  # debian-reference.de.html
    if m and m.group(1) in LANGS:
        return False
    return not SKIP_PAGE_RE.search(path)


def html_tree(root, pattern, pool):
    paths = [p for p in files_under(root, pattern)
             if p.endswith((".html", ".htm", ".html.gz", ".xhtml")) and english_html(p)
             and not os.path.islink(p)]
    for pars in pool.imap(html_page, paths, chunksize=8):  # imap keeps the sorted order
        if pars:
            yield pars


# man pages through groff: one output line per paragraph (a 4000n line length never wraps).
def man_page(path):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    if raw.lstrip().startswith(b".so "):
        return []  # a stub pointing at another page
    try:
        out = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-rLL=4000n", "-rHY=0", "-P-cbou"],
                             input=raw, capture_output=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return []
    return [clean(line) for line in out.decode("utf-8", "replace").split("\n") if line.strip()]


def man_pages(root, pool):
    paths = [p for p in files_under(root, "usr/share/man/man*/*") if not os.path.islink(p)]
    for pars in pool.imap(man_page, paths, chunksize=16):
        if pars:
            yield pars


# info manuals: nodes separated by \x1f; drop the node header line and the menu.
def info_pages(root):
    for path in files_under(root, "usr/share/info/*.info*"):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        for node in text.split("\x1f"):
            lines = node.split("\n")
            if not lines or not lines[0].strip() and len(lines) > 1:
                lines = lines[1:]
            if lines and lines[0].startswith("File:"):
                lines = lines[1:]
            body = "\n".join(lines)
            body = body.split("\n* Menu:")[0]
            pars = [clean(p) for p in re.split(r"\n\s*\n", body)]
            pars = [p for p in pars if p]
            if pars:
                yield pars


# R packages' text data through Rscript: Jane Austen's novels, Moby Dick.
def r_text(root, expr):
    lib = os.path.join(root, "usr/lib/R/site-library")
    env = dict(os.environ, R_LIBS=lib)
    out = subprocess.run(["Rscript", "--vanilla", "-e", expr], env=dict(env, R_LIBS_USER=lib),
                         capture_output=True, check=True).stdout.decode("utf-8", "replace")
    # Lines wrapped at ~70 columns, blank lines between paragraphs; CHAPTER lines start documents.
    docs, pars, cur = [], [], []
    for line in out.split("\n"):
        if re.match(r"^\s*(CHAPTER|Chapter|CHAPTER\s+\d+)\b", line):
            if cur:
                pars.append(clean(" ".join(cur)))
                cur = []
            if pars:
                docs.append(pars)
            pars = []
            continue
        if line.strip():
            cur.append(line)
        elif cur:
            pars.append(clean(" ".join(cur)))
            cur = []
    if cur:
        pars.append(clean(" ".join(cur)))
    if pars:
        docs.append(pars)
    yield from docs


AUSTEN = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion"]

# ---- sources, in the fixed build order -----------------------------------------------------------
# (name, quick?, extractor(root, pool) -> documents)
SOURCES = [
    ("austen", False, lambda r, p: (d for b in AUSTEN for d in r_text(
        r, f"suppressMessages(library(janeaustenr)); writeLines(janeaustenr::{b})"))),
    ("mobydick", False, lambda r, p: r_text(
        r, "data(mobydick, package='tokenizers'); writeLines(strsplit(mobydick, '\\n')[[1]])")),
    ("bible-web", True, lambda r, p: sword(r, "web", True)),
    ("bible-kjv", True, lambda r, p: sword(r, "kjv", True)),
    ("comm-tdavid", False, lambda r, p: sword(r, "tdavid", False)),
    ("comm-mhcc", False, lambda r, p: sword(r, "mhcc", False)),
    ("comm-scofield", True, lambda r, p: sword(r, "scofield", False)),
    ("cfi", True, lambda r, p: html_tree(r, "usr/share/doc/cfi-en/**/*", p)),
    ("devil", True, lambda r, p: dictd(r, "devil")),
    ("jargon", True, lambda r, p: dictd(r, "jargon")),
    ("fortunes", True, lambda r, p: fortunes(r)),
    # technical prose
    ("linux-doc", False, lambda r, p: html_tree(r, "usr/share/doc/linux-doc-6.1/**/*", p)),
    ("python-doc", False, lambda r, p: html_tree(r, "usr/share/doc/python3.11/html/**/*", p)),
    ("postgresql-doc", False, lambda r, p: html_tree(r, "usr/share/doc/postgresql-doc-15/**/*", p)),
    ("django-doc", False, lambda r, p: html_tree(r, "usr/share/doc/python-django-doc/**/*", p)),
    ("rust-doc", False, lambda r, p: html_tree(r, "usr/share/doc/rust-doc/html/**/*", p)),
    ("git-doc", False, lambda r, p: html_tree(r, "usr/share/doc/git-doc/**/*", p)),
    ("apache2-doc", False, lambda r, p: html_tree(r, "usr/share/doc/apache2-doc/manual/**/*", p)),
    ("libreoffice-help", False, lambda r, p: html_tree(r, "usr/share/libreoffice/help/en-US/**/*", p)),
    ("gimp-help", False, lambda r, p: html_tree(r, "usr/share/gimp/2.0/help/en/**/*", p)),
    ("gnome-user-docs", False, lambda r, p: html_tree(r, "usr/share/help/C/**/*", p)),
    ("r-doc", False, lambda r, p: html_tree(r, "usr/share/R/doc/**/*", p)),
    ("bash-doc", False, lambda r, p: html_tree(r, "usr/share/doc/bash-doc/**/*", p)),
    ("sphinx-doc", False, lambda r, p: html_tree(r, "usr/share/doc/sphinx-doc/**/*", p)),
    ("debian-handbook", False, lambda r, p: html_tree(r, "usr/share/doc/debian-handbook/html/en-US/**/*", p)),
    ("debian-reference", False, lambda r, p: html_tree(r, "usr/share/debian-reference/**/*", p)),
    ("info", False, lambda r, p: info_pages(r)),
    ("man", False, lambda r, p: man_pages(r, p)),
    # lower value
    ("gcide", False, lambda r, p: dictd(r, "gcide")),
    ("wordnet", False, lambda r, p: dictd(r, "wn")),
    ("foldoc", False, lambda r, p: dictd(r, "foldoc")),
    ("openjdk-doc", False, lambda r, p: html_tree(r, "usr/share/doc/openjdk-17-jre-headless/api/**/*", p)),
    ("qt5-doc", False, lambda r, p: html_tree(r, "usr/share/qt5/doc/**/*", p)),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="where the .deb files were unpacked")
    ap.add_argument("--out", required=True, help="corpus text file to write")
    ap.add_argument("--quick", action="store_true", help="only the small prose sources")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="", help="comma-separated source names (debugging)")
    args = ap.parse_args()

    only = set(filter(None, args.only.split(",")))
    seen = set()  # 8-byte digests of every kept paragraph: exact dedup within and across sources
    stats = []
    tmp = args.out + ".tmp"
    t0 = time.time()
    with Pool(args.jobs) as pool, open(tmp, "w", encoding="utf-8") as out:
        for name, quick, extract in SOURCES:
            if (args.quick and not quick) or (only and name not in only):
                continue
            s = {"source": name, "documents": 0, "paragraphs": 0, "bytes": 0, "dropped_prose": 0,
                 "dropped_duplicate": 0}
            try:
                docs = extract(args.root, pool)
                for doc in docs:
                    kept = []
                    for par in doc:
                        if not prose_ok(par):
                            s["dropped_prose"] += 1
                            continue
                        h = hashlib.blake2b(par.encode("utf-8"), digest_size=8).digest()
                        if h in seen:
                            s["dropped_duplicate"] += 1
                            continue
                        seen.add(h)
                        kept.append(par)
                    if kept:
                        out.write("\n".join(kept) + "\n\n")
                        s["documents"] += 1
                        s["paragraphs"] += len(kept)
                        s["bytes"] += sum(len(p.encode("utf-8")) + 1 for p in kept)
            except (OSError, subprocess.CalledProcessError) as e:
                # A missing package/tool makes the corpus smaller, not wrong: say so loudly.
                s["error"] = str(e)[:300]
                print(f"corpus: WARNING: source {name} failed: {s['error']}", file=sys.stderr)
            stats.append(s)
            print(f"corpus: {name:18s} {s['documents']:7d} docs {s['paragraphs']:8d} paragraphs "
                  f"{s['bytes'] / 1e6:8.2f} MB (dropped: {s['dropped_prose']} not prose, "
                  f"{s['dropped_duplicate']} duplicates) [{time.time() - t0:.0f} s]",
                  file=sys.stderr, flush=True)
    os.replace(tmp, args.out)
    sha = hashlib.sha256()
    with open(args.out, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    manifest = {"corpus": os.path.basename(args.out), "quick": args.quick, "sha256": sha.hexdigest(),
                "bytes": os.path.getsize(args.out), "sources": stats,
                "seconds": round(time.time() - t0, 1)}
    with open(args.out + ".json", "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"corpus: wrote {args.out}: {manifest['bytes'] / 1e6:.1f} MB, sha256 {manifest['sha256']}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
