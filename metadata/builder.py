"""``recap metadata build``: MetaCLIP metadata from sources a user combines, in MetaCLIP's format.

Like upstream's ``metaclip/metaclip1/build_metadata.py`` (facebookresearch/MetaCLIP): the numbers
0–99, WordNet names (every synset's lemmas by default; ``--wordnet-names synsets``: upstream's one
NLTK synset name per synset), frequent unigrams (upstream: Wikipedia unigrams with count ≥ 100; here `wordfreq`'s
English list above a Zipf floor, offline), bigrams with high PMI (upstream: Wikipedia; here any
corpus the user points at, the job's own captions by default) and titles (upstream: Wikipedia page
titles by views; here a user file). Empty entries and single ASCII punctuation marks are left out, as
upstream does; entries with padded marks or odd spaces are kept (as upstream) with a warning. Unlike upstream (a
Python set, so a random order), the order is deterministic: sources in the order above, each sorted,
first occurrence wins.

Outputs ``metadata.json`` (a flat JSON list of strings; index = entry id) and, beside it,
``metadata.sources.json``: ``{entry: [source names]}`` in entry order, source names among
``numbers``, ``wordnet``, ``unigrams``, ``bigrams``, ``titles`` (every source that gave the entry).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Iterator

import fsspec

from recap.metadata.normalize import spacing
from recap.metadata.wordnet import DEFAULT_WORDNET, NAME_KINDS, wordnet_names

_FORBIDDEN = frozenset(string.punctuation)  # upstream drops entries that are a single ASCII mark


def frequent_unigrams(min_zipf: float = 3.0, lang: str = "en") -> list[str]:
    import wordfreq

    out = []
    for w in wordfreq.iter_wordlist(lang, "best"):
        if wordfreq.zipf_frequency(w, lang) < min_zipf:
            break  # the list is sorted by frequency
        out.append(w)
    return out


_TOKEN = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*", re.UNICODE)


def read_texts(path: str, column: str = "caption") -> Iterator[str]:
    """Texts from parquet/csv/tsv/jsonl/json (``column``) or txt (one per line); a directory or glob
    of parquet files (e.g. a dataset's ``input/``) works too."""
    fs, root = fsspec.core.url_to_fs(path)
    paths = sorted(fs.glob(root)) if any(c in root for c in "*?[") else (
        sorted(p for p in fs.find(root) if p.endswith(".parquet")) if fs.isdir(root) else [root])
    if not paths:
        raise FileNotFoundError(f"{path}: no text files")
    for p in paths:
        ext = p.rsplit(".", 1)[-1].lower()
        with fs.open(p, "rb") as f:
            if ext == "parquet":
                import pyarrow.parquet as pq

                schema = pq.read_schema(f)
                if column not in schema.names:
                    raise ValueError(f"{p}: no column {column!r} (has {', '.join(schema.names)})")
                f.seek(0)
                yield from (t for t in pq.read_table(f, columns=[column]).column(column).to_pylist() if t)
            elif ext in ("csv", "tsv"):
                import csv
                import io

                reader = csv.DictReader(io.TextIOWrapper(f, "utf-8", errors="replace"), delimiter="\t" if ext == "tsv" else ",")
                if column not in (reader.fieldnames or []):
                    raise ValueError(f"{p}: no column {column!r}")
                yield from (row[column] for row in reader if row.get(column))
            elif ext in ("jsonl", "json"):
                yield from _json_texts(p, f, column, lines=ext == "jsonl")
            else:
                yield from (line.decode("utf-8", "replace").strip() for line in f if line.strip())


def _json_texts(p: str, f, column: str, lines: bool) -> Iterator[str]:
    """``column`` of each JSON object (one per line, or a JSON list); a bad record names its line."""
    if lines:
        records = ((n, line) for n, line in enumerate(f, 1) if line.strip())
    else:
        data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of objects")
        records = ((n, r) for n, r in enumerate(data, 1))
    seen = False
    for n, rec in records:
        if lines:
            try:
                rec = json.loads(rec)
            except ValueError as e:
                raise ValueError(f"{p}:{n}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        if column in rec:
            seen = True
            if isinstance(rec[column], str) and rec[column]:
                yield rec[column]
    if not seen:
        raise ValueError(f"{p}: no record has a field {column!r}")


def pmi_bigrams(texts: Iterable[str], min_count: int = 5, min_pmi: float = 3.0, max_bigrams: int | None = None) -> list[str]:
    """Adjacent word pairs by pointwise mutual information, log p(ab) / (p(a) p(b)), over a corpus."""
    uni: Counter = Counter()
    bi: Counter = Counter()
    for text in texts:
        words = _TOKEN.findall(text)
        uni.update(words)
        bi.update(zip(words, words[1:]))
    n_uni, n_bi = sum(uni.values()), sum(bi.values())
    if not n_bi:
        return []
    scored = []
    for (a, b), c in bi.items():
        if c >= min_count:
            pmi = math.log((c / n_bi) / ((uni[a] / n_uni) * (uni[b] / n_uni)))
            if pmi >= min_pmi:
                scored.append((-pmi, f"{a} {b}"))
    scored.sort()
    return [e for _, e in scored[:max_bigrams]]


def read_titles(path: str) -> list[str]:
    with fsspec.open(path, "r", encoding="utf-8", errors="replace") as f:
        return [line.strip().replace("_", " ") for line in f if line.strip()]


def combine(sources: list[tuple[str, list[str]]]) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """Sources in the given order, each sorted; the first occurrence of an entry wins. Upstream drops
    empty entries and single ASCII punctuation marks (``string.punctuation``) — so do we; everything
    else is kept as is. Returns (entries, {entry: [sources]}, {problem: examples}) ."""
    entries: list[str] = []
    where: dict[str, list[str]] = {}
    dropped: dict[str, list[str]] = {"empty (dropped, as upstream)": [],
                                     "a single punctuation mark (dropped, as upstream)": [],
                                     "duplicated within or across sources (kept once, first source first)": []}
    empty, marks, dups = dropped.values()
    for name, items in sources:
        seen_here: set[str] = set()
        for e in sorted(items):
            if not e:
                empty.append(f"<empty, from {name}>")
                continue
            if e in _FORBIDDEN:
                marks.append(e)
                continue
            if e in seen_here or e in where:
                dups.append(e)
            seen_here.add(e)
            if e not in where:
                where[e] = []
                entries.append(e)
            if name not in where[e]:
                where[e].append(name)
    return entries, where, {k: v for k, v in dropped.items() if v}


def lint(entries: list[str]) -> dict[str, list[str]]:
    """Entries that will (mostly) never match (kept, as upstream): their own marks or tab/newline get
    padded or replaced in texts, or their spaces are not single inner ones."""
    padded = [e for e in entries if spacing(e) != f" {e} "]
    spaced = [e for e in entries if e != e.strip(" ") or "  " in e]
    return {k: v for k, v in {"contain , . ; : ? ! ` or a tab/newline (padded in texts; kept, as upstream)": padded,
                              "have leading/trailing or double spaces (kept, as upstream)": spaced}.items() if v}


def build(*, wordnet: str | None = None, wordnet_kind: str = "lemmas", unigrams: bool = False, min_zipf: float = 3.0,
          bigrams_from: str | None = None, text_col: str = "caption", min_count: int = 5, min_pmi: float = 3.0,
          max_bigrams: int | None = None, titles: str | None = None, numbers: bool = True,
          max_entries: int | None = None) -> tuple[list[str], dict, dict]:
    sources: list[tuple[str, list[str]]] = []
    if numbers:
        sources.append(("numbers", [str(i) for i in range(100)]))
    if wordnet is not None:
        sources.append(("wordnet", wordnet_names(wordnet, wordnet_kind)))
    if unigrams:
        sources.append(("unigrams", frequent_unigrams(min_zipf)))
    if bigrams_from:
        sources.append(("bigrams", pmi_bigrams(read_texts(bigrams_from, text_col), min_count, min_pmi, max_bigrams)))
    if titles:
        sources.append(("titles", read_titles(titles)))
    entries, where, problems = combine(sources)
    if max_entries:
        entries = entries[:max_entries]
        where = {e: where[e] for e in entries}
    return entries, where, problems


def sources_path(out: str) -> str:
    return out[:-5] + ".sources.json" if out.endswith(".json") else out + ".sources.json"


def _warn(what: str, items: list[str]) -> None:
    print(f"warning: {len(items)} entries {what}: {', '.join(repr(x) for x in items[:5])}"
          f"{', ...' if len(items) > 5 else ''}", file=sys.stderr)


def metadata_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="recap metadata", description="MetaCLIP metadata tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build metadata.json from WordNet, unigrams, PMI bigrams and titles",
                       description="Writes OUT (a flat JSON list of strings, MetaCLIP's format; index = entry id) and "
                                   "OUT's *.sources.json beside it: {entry: [source names]}. Order: numbers 0-99, "
                                   "wordnet, unigrams, bigrams, titles, each sorted; first occurrence wins.")
    b.add_argument("--out", required=True, help="metadata.json to write (metadata.sources.json goes beside it)")
    b.add_argument("--wordnet", nargs="?", const=DEFAULT_WORDNET, metavar="DIR",
                   help=f"WordNet 3.0 dict dir with data.noun etc. (default {DEFAULT_WORDNET}: apt-get install wordnet-base)")
    b.add_argument("--wordnet-names", choices=NAME_KINDS, default="lemmas",
                   help="lemmas: every lemma of every synset; synsets: upstream's one NLTK synset name each")
    b.add_argument("--unigrams", action="store_true", help="frequent English words (wordfreq)")
    b.add_argument("--min-zipf", type=float, default=3.0, help="unigram frequency floor (Zipf scale; 3 = once per million words)")
    b.add_argument("--bigrams-from", metavar="PATH", help="corpus for PMI bigrams: parquet/csv/tsv/jsonl/json/txt, a dir or glob "
                                                          "(e.g. DATASET/input/*.parquet or the job's input.path)")
    b.add_argument("--job", metavar="JOB.yaml", help="PMI bigrams from this job's own captions (its input.path and "
                                                     "caption_col) unless --bigrams-from names another corpus")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the job's fields, as recap run")
    b.add_argument("--text-col", default=None, help="text column of the bigram corpus (default caption)")
    b.add_argument("--min-count", type=int, default=5, help="bigram count floor")
    b.add_argument("--min-pmi", type=float, default=3.0, help="bigram PMI floor, natural log")
    b.add_argument("--max-bigrams", type=int, help="keep the top K bigrams by PMI")
    b.add_argument("--titles", metavar="PATH", help="titles, one per line (underscores read as spaces)")
    b.add_argument("--no-numbers", action="store_true", help="leave out the numbers 0-99 upstream starts with")
    b.add_argument("--max-entries", type=int, help="cut the list (upstream: 500000)")
    args = p.parse_args(argv)
    if args.job:
        from recap.pipeline.job import JobError, load_job

        try:
            job = load_job(args.job, args.set)
        except JobError as e:
            print(f"recap metadata: {e}", file=sys.stderr)
            return 2
        if not args.bigrams_from:
            args.bigrams_from = job.input.path
            args.text_col = args.text_col or job.input.caption_col
    args.text_col = args.text_col or "caption"
    if not (args.wordnet or args.unigrams or args.bigrams_from or args.titles):
        p.error("name at least one source: --wordnet [DIR], --unigrams, --bigrams-from PATH (or --job JOB), --titles PATH")
    try:
        entries, where, problems = build(
            wordnet=args.wordnet, wordnet_kind=args.wordnet_names, unigrams=args.unigrams, min_zipf=args.min_zipf,
            bigrams_from=args.bigrams_from, text_col=args.text_col, min_count=args.min_count, min_pmi=args.min_pmi,
            max_bigrams=args.max_bigrams, titles=args.titles, numbers=not args.no_numbers, max_entries=args.max_entries)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"recap metadata: {e}", file=sys.stderr)
        return 1
    for what, items in problems.items():
        _warn(f"were {what}", items)
    for what, items in lint(entries).items():
        _warn(f"{what} and will mostly never match", items)
    if not entries:
        print("recap metadata: no entries: the sources gave nothing", file=sys.stderr)
        return 1
    out = args.out
    fs, path = fsspec.core.url_to_fs(out)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fsspec.open(out, "w", encoding="utf-8") as f:
        json.dump(entries, f, ensure_ascii=False)
    side = sources_path(out)
    with fsspec.open(side, "w", encoding="utf-8") as f:
        json.dump(where, f, ensure_ascii=False)
    counts = Counter(s for v in where.values() for s in v)
    print(f"wrote {len(entries)} entries to {out} ({', '.join(f'{k}: {v}' for k, v in counts.items())}); sources in {side}")
    return 0
