#!/usr/bin/env python3
"""Builds recall-from-context task files (the `contains` schema of `nha eval`) from real documents
that any Debian machine has: its package records and a prose text (stdlib only).

    scripts/make-recall-tasks.py --prose runs/data/quick/heldout.txt --out runs/data/recall

writes, in --out:
  passkey.jsonl        needle in real prose (Mohtashami & Jaggi's passkey test on real text):
                       ~--context-words words of consecutive prose paragraphs with one sentence
                       "The pass key is 48213. Remember it. 48213 is the pass key." inserted at a
                       random paragraph boundary; the context ends with
                       "What is the pass key? The pass key is" and the answer is the number.
  debian_fields.jsonl  field extraction from semi-structured records (the SWDE/FDA kind of task):
                       --records-per-row package records of the dpkg database (Package, Version,
                       Maintainer, Installed-Size, ..., one-line Description) and then
                       "Package: <one of them>\n<Field>:"; the answer is that record's value.
                       Only values that no other record in the same context contains (or is
                       contained in) are asked, so a copy of the wrong record never matches.
  manifest.json        the inputs (paths, sizes, sha256), the options and the row counts.

Rows are {"context", "answer", ...metadata}; `nha eval RUN --tasks passkey=DIR/passkey.jsonl:contains`
scores them (greedy until a newline, case-insensitive substring match, docs/eval.md). The output
is a pure function of the input files and --seed. Use held-out prose (text the model was not
trained on) so that the task measures recall from the context, not memory. docs/eval.md has the
details and the reasoning.
"""
import argparse
import hashlib
import json
import os
import random
import sys

RECORD_FIELDS = ["Package", "Version", "Architecture", "Maintainer", "Installed-Size", "Section",
                 "Priority", "Homepage", "Description"]
ASKED_FIELDS = ["Version", "Maintainer", "Installed-Size", "Homepage", "Section"]


def fail(message):
    sys.exit(f"make-recall-tasks: {message}")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, text):
    """Writes to a temporary name, then renames: readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def jsonl(rows):
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ---- passkey in prose ----------------------------------------------------------------------------

def read_paragraphs(path):
    """Non-empty lines of a one-paragraph-per-line text (the corpus format of get-corpus.sh)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = [line.strip() for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read --prose {path}: {e.strerror}. HINT: pass a text file, e.g. the held-out "
             "lines of the corpus (runs/data/quick/heldout.txt after scripts/quickstart.sh)")
    return paragraphs


def haystack(paragraphs, start, words):
    """Consecutive paragraphs from `start` (wrapping around) until `words` words; the last one cut."""
    out, count, i = [], 0, start
    while count < words:
        tokens = paragraphs[i % len(paragraphs)].split()
        take = tokens[: words - count]
        out.append(" ".join(take))
        count += len(take)
        i += 1
    return out


def passkey_rows(paragraphs, rows, words, rng):
    total_words = sum(len(p.split()) for p in paragraphs)
    if total_words < 2 * words:
        fail(f"--prose has {total_words} words; a {words}-word context needs at least {2 * words}. "
             "HINT: pass a longer text or a smaller --context-words")
    out = []
    for _ in range(rows):
        key = str(rng.randrange(10000, 100000))
        parts = haystack(paragraphs, rng.randrange(len(paragraphs)), words)
        depth = rng.randrange(len(parts) + 1)  # insert before parts[depth] (len: at the end)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        parts.insert(depth, needle)
        context = "\n".join(parts) + "\nWhat is the pass key? The pass key is"
        out.append({"context": context, "answer": key, "depth": round(depth / (len(parts) - 1), 3),
                    "context_words": words})
    return out


# ---- fields of package records -------------------------------------------------------------------

def read_records(path):
    """dpkg status / Packages records (RFC 822 style) as dicts of the RECORD_FIELDS they have."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read --records {path}: {e.strerror}. HINT: on Debian the package database is "
             "/var/lib/dpkg/status; any Packages file of an apt mirror works too")
    records = []
    for block in text.split("\n\n"):
        rec = {}
        for line in block.splitlines():
            if not line or line[0] in " \t" or ":" not in line:
                continue  # continuation lines (long descriptions, conffiles) are left out
            key, value = line.split(":", 1)
            if key in RECORD_FIELDS and value.strip():
                rec[key] = value.strip()
        if "Package" in rec and "Version" in rec:
            records.append(rec)
    if len(records) < 20:
        fail(f"--records {path} has {len(records)} package records; at least 20 are needed")
    return records


def format_record(rec):
    return "\n".join(f"{k}: {rec[k]}" for k in RECORD_FIELDS if k in rec)


def unique_value(records, target, field):
    """True when target[field] is not contained in / does not contain another record's value."""
    value = target[field].lower()
    for rec in records:
        if rec is target or field not in rec:
            continue
        other = rec[field].lower()
        if value in other or other in value:
            return False
    return True


def field_rows(records, rows, per_row, rng):
    out = []
    attempts = 0
    while len(out) < rows:
        attempts += 1
        if attempts > 50 * rows:
            fail("could not find enough records with distinguishable field values. HINT: use a "
                 "larger --records file or fewer --records-per-row")
        chosen = rng.sample(records, per_row)
        target = rng.choice(chosen)
        field = rng.choice(ASKED_FIELDS)
        if field not in target or not unique_value(chosen, target, field):
            continue
        context = "\n\n".join(format_record(r) for r in chosen)
        context += f"\n\nPackage: {target['Package']}\n{field}:"
        out.append({"context": context, "answer": target[field], "field": field,
                    "package": target["Package"]})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prose", required=True, help="one-paragraph-per-line text (held-out prose)")
    p.add_argument("--records", default="/var/lib/dpkg/status", help="dpkg status or Packages file")
    p.add_argument("--rows", type=int, default=500, help="rows per task")
    p.add_argument("--context-words", type=int, default=900,
                   help="passkey context length in words (~1.3 tokens per word with a 16k BPE)")
    p.add_argument("--records-per-row", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.rows < 1 or a.context_words < 10 or a.records_per_row < 2:
        fail("--rows must be >= 1, --context-words >= 10 and --records-per-row >= 2")

    os.makedirs(a.out, exist_ok=True)
    paragraphs = read_paragraphs(a.prose)
    records = read_records(a.records)
    # Separate streams, so changing one task's options leaves the other's rows as they were.
    passkey = passkey_rows(paragraphs, a.rows, a.context_words, random.Random(f"passkey-{a.seed}"))
    fields = field_rows(records, a.rows, a.records_per_row, random.Random(f"fields-{a.seed}"))
    write_atomic(os.path.join(a.out, "passkey.jsonl"), jsonl(passkey))
    write_atomic(os.path.join(a.out, "debian_fields.jsonl"), jsonl(fields))
    manifest = {
        "inputs": {name: {"path": path, "bytes": os.path.getsize(path), "sha256": sha256_of(path)}
                   for name, path in (("prose", a.prose), ("records", a.records))},
        "options": {"rows": a.rows, "context_words": a.context_words,
                    "records_per_row": a.records_per_row, "seed": a.seed},
        "tasks": {"passkey": len(passkey), "debian_fields": len(fields)},
    }
    write_atomic(os.path.join(a.out, "manifest.json"), json.dumps(manifest, indent=2))
    print(f"make-recall-tasks: {len(passkey)} passkey rows ({a.context_words} words of prose each), "
          f"{len(fields)} debian_fields rows ({a.records_per_row} records each) in {a.out}")


if __name__ == "__main__":
    main()
