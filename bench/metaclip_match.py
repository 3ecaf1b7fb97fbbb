"""MetaCLIP sub-string matching: recap's Matcher against upstream's own algorithm, same entries, same
texts, one run; the ids are checked to be the same for every text (exit 1 if not).

    .venv/bin/python bench/metaclip_match.py [--entries 6000,500000] [--modes metaclip1,metaclip2]
                                             [--texts 100000] [--naive-texts 20] [--seed 0] [--repeat 5] [--stage]

Synthetic but realistic: entries are unique unigrams and bigrams over a vocabulary of wordfreq's top
English words plus seeded syllable words (so 500k entries exist); captions are 10–30 words drawn
Zipf-like from the same vocabulary, with capitals, punctuation, tabs and newlines here and there.

Per entry-list size and mode:
(a) upstream's reference loop (``" e " in spacing(text)`` for every entry; metaclip/metaclip1/substr_matching.py)
    on a few texts: the definition, to check (b) and (c) against;
(b) upstream's automaton, written here as upstream writes it (facebookresearch/MetaCLIP, commit f47f784):
    metaclip1 — metaclip/metaclip1/substr_matching_ahocorasick.py: keys ``f" {e} "``, ``add_word(key, (id, key))``,
    then per text ``spacing`` (its chain of ``str.replace``), ``Automaton.iter``, a set of ids;
    metaclip2 — the same with metaclip/curation/substr_matching.py's keys (``get_spaced_metadata``) and
    ``substr_match``, after ``txt.strip()`` as metaclip/curation/curate.py's ``count_per_shard`` does;
(c) recap's ``Matcher.match_arrow`` on an Arrow string column (what the balance stage calls), and
    ``Matcher.match`` on the Python list.
Prints texts/s and (c)/(b) (goal >= 1.5), each the best of ``--repeat`` runs taken in turn. ``--stage``
adds the balance stage's own passes end to end (partial, reduce, apply over shards, in one process;
the best run) and (per-text passes)/(b) (goal >= 1.2).
"""
from __future__ import annotations

import argparse
import gc
import pickle
import random
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import record  # noqa: E402

import ahocorasick
import numpy as np
import pyarrow as pa

from recap.metadata import Matcher

ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch", "cl",
          "dr", "fl", "gr", "kr", "pl", "qu", "sh", "st", "th", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "oo", "ou", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "x"]
# whitespace at the ends, where the modes differ (matched, not timed)
EDGE_TEXTS = ["\u3000dog", "hot dog\u3000", "\u00a0hot dog\u2009", " \t\u3000dog.\u3000 ", "\u2009\u00a0!", "dog", "",
              "\u3000", "a hot dog\u202f", "\ufeffdog"]


def vocabulary(n: int, rng: random.Random) -> list[str]:
    try:
        import wordfreq

        words = [w for w in wordfreq.top_n_list("en", 50_000) if w.isalpha()]
    except Exception:  # noqa: BLE001 — the benchmark still runs without wordfreq
        words = []
    seen = set(words)
    while len(words) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def make_entries(vocab: list[str], n: int, rng: random.Random) -> list[str]:
    n_uni = min(len(vocab), int(n * 0.6))
    entries = vocab[:n_uni]
    seen = set(entries)
    head = vocab[:20_000]
    while len(entries) < n:  # bigrams: one frequent word with any other, both orders
        a, b = rng.choice(head), rng.choice(vocab)
        e = f"{a} {b}" if rng.random() < 0.5 else f"{b} {a}"
        if e not in seen:
            seen.add(e)
            entries.append(e)
    entries += [e for e in ("U.S.", "St. Louis", "!", "hot dog", "dog") if e not in seen]  # odd ones upstream keeps
    return entries


def make_texts(vocab: list[str], n: int, seed: int) -> list[str]:
    g = np.random.default_rng(seed)
    ranks = np.arange(1, len(vocab) + 1)
    w = 1.0 / ranks ** 1.07
    cdf = np.cumsum(w / w.sum())
    seps = np.array([" "] * 40 + [", ", ". ", "! ", "? ", ": ", "; ", " - ", "\t", "\n", "  ", " `", " (", ") "])
    lengths = g.integers(10, 31, n)
    idx = np.minimum(np.searchsorted(cdf, g.random(int(lengths.sum()))), len(vocab) - 1)
    sep_idx = g.integers(0, len(seps), int(lengths.sum()))
    caps = g.random(int(lengths.sum())) < 0.08
    texts, k = [], 0
    for L in lengths.tolist():
        parts = []
        for j in range(k, k + L):
            word = vocab[idx[j]]
            parts.append((word.capitalize() if caps[j] else word) + seps[sep_idx[j]])
        k += L
        texts.append("".join(parts).strip() + ("." if g.random() < 0.5 else ""))
    return texts


# -- upstream's algorithm, written here from facebookresearch/MetaCLIP (commit f47f784) ---------------

UP_MARKS = (",", ".", ";", ":", "?", "!", "`")
UP_TO_SPACE = ("\t", "\n", "\r")
UP_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
          (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
          (0x2FF0, 0x2FFF), (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF))
UP_PUNCT = set(string.punctuation) | set("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")


def up_spacing(text: str) -> str:
    """``spacing`` of metaclip/metaclip1/substr_matching.py and metaclip/curation/substr_matching.py:
    pad, then one ``str.replace`` per mark and per tab/newline/carriage return, in that order."""
    text = f" {text} "
    for mark in UP_MARKS:
        text = text.replace(mark, f" {mark} ")
    for ch in UP_TO_SPACE:
        text = text.replace(ch, " ")
    return text


def up_cjk_or_similar(ch: str) -> bool:
    """``is_cjk_or_similar`` of metaclip/curation/substr_matching.py: the CJK-like ranges or punctuation."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in UP_CJK) or ch in UP_PUNCT


def up_keys(entries: list[str], mode: str) -> list[str]:
    """metaclip1: substr_matching_ahocorasick.py's ``f" {entry} "``; metaclip2: curation/substr_matching.py's
    ``get_spaced_metadata`` (a space on each side whose end character is not CJK-like)."""
    if mode == "metaclip1":
        return [f" {e} " for e in entries]
    return [("" if up_cjk_or_similar(e[0]) else " ") + e + ("" if up_cjk_or_similar(e[-1]) else " ") for e in entries]


def up_automaton(keys: list[str]) -> ahocorasick.Automaton:
    """``initialize_automaton`` of both files: each key stored with (its id, itself)."""
    automaton = ahocorasick.Automaton()
    for idx, key in enumerate(keys):
        automaton.add_word(key, (idx, key))
    automaton.make_automaton()
    return automaton


def up_match(automaton: ahocorasick.Automaton, texts: list[str], mode: str) -> list[list[int]]:
    """Per text, as upstream's matchers do: metaclip1's ``substr_matching`` (ahocorasick variant);
    metaclip2's ``txt.strip()`` (curate.py) then ``substr_match``: ``spacing``, a set of the ids
    ``Automaton.iter`` finds, as a list."""
    out = []
    for text in texts:
        if mode == "metaclip2":
            text = text.strip()
        matched = set()
        for _, (entry_id, _) in automaton.iter(up_spacing(text)):
            matched.add(entry_id)
        out.append(list(matched))
    return out


def up_loop(keys: list[str], texts: list[str], mode: str) -> list[list[int]]:
    """The reference loop of metaclip/metaclip1/substr_matching.py (``substr_matching``), over the mode's keys."""
    out = []
    for text in texts:
        spaced = up_spacing(text.strip() if mode == "metaclip2" else text)
        out.append([i for i, key in enumerate(keys) if key in spaced])
    return out


# -- the run --------------------------------------------------------------------------------------------

def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def interleaved(repeat: int, *calls: tuple) -> list[tuple[object, float]]:
    """(output, best time) of each ``(fn, *args)``, run in turn ``repeat`` times, so that a burst
    of load elsewhere on the machine slows them alike."""
    best = [float("inf")] * len(calls)
    out: list[object] = [None] * len(calls)
    for _ in range(repeat):
        for k, (fn, *fn_args) in enumerate(calls):
            t0 = time.perf_counter()
            out[k] = fn(*fn_args)
            best[k] = min(best[k], time.perf_counter() - t0)
    return list(zip(out, best))


def run_one(entries: list[str], texts: list[str], mode: str, args: argparse.Namespace) -> dict:
    keys = up_keys(entries, mode)
    t0 = time.perf_counter()
    automaton = up_automaton(keys)
    up_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = Matcher(entries, mode=mode)
    build = time.perf_counter() - t0
    print(f"  build: upstream automaton {up_build:.2f}s, recap Matcher {build:.2f}s")

    few = texts[:args.naive_texts]
    t0 = time.perf_counter()
    want_few = up_loop(keys, few, mode)
    loop_s = time.perf_counter() - t0

    column = pa.array(texts, pa.string())
    (up, up_s), (got, arrow_s), (got_list, list_s) = interleaved(
        args.repeat, (up_match, automaton, texts, mode), (matcher.match_arrow, column), (matcher.match, texts))
    got = got.to_pylist()

    same = [sorted(ids) for ids in up] == got == got_list and got[:len(few)] == want_few
    edge_up = [sorted(ids) for ids in up_match(automaton, EDGE_TEXTS, mode)]
    edge_same = edge_up == matcher.match(EDGE_TEXTS) == matcher.match_arrow(pa.array(EDGE_TEXTS)).to_pylist()
    edge_same = edge_same and edge_up == up_loop(keys, EDGE_TEXTS, mode)
    n_ids = sum(map(len, got))
    r_loop, r_up, r_arrow, r_list = (rate(len(few), loop_s), rate(len(texts), up_s), rate(len(texts), arrow_s),
                                     rate(len(texts), list_s))
    print(f"  (a) upstream reference loop: {r_loop:12.1f} texts/s  ({len(few)} texts, {loop_s:.2f}s)")
    print(f"  (b) upstream automaton:      {r_up:12.1f} texts/s  ({up_s:.3f}s; {n_ids / len(texts):.1f} ids/text)")
    print(f"  (c) recap match_arrow:       {r_arrow:12.1f} texts/s  ({arrow_s:.3f}s)")
    print(f"      recap match (lists):     {r_list:12.1f} texts/s  ({list_s:.3f}s)")
    print(f"  ids identical to upstream's: {'yes' if same else 'NO'} ({len(texts)} texts); "
          f"on the {len(EDGE_TEXTS)} whitespace-edge texts: {'yes' if edge_same else 'NO'}")
    print(f"  ratio (c)/(b) = {r_arrow / r_up:.2f}x  (match: {r_list / r_up:.2f}x; goal >= 1.5); "
          f"(c)/(a) = {r_arrow / r_loop:.0f}x")
    result = {"entries": len(entries), "mode": mode, "up": r_up, "arrow": r_arrow, "list": r_list,
              "ok": same and edge_same, "stage": None, "matcher": matcher}
    del automaton
    if args.stage:
        runs = [stage_end_to_end(entries, texts, mode, args.shards) for _ in range(args.repeat)]
        s, stats = min(runs, key=lambda r: r[1]["partial"] + r[1]["apply"])
        per_text = rate(len(texts), stats["partial"] + stats["apply"])
        print(f"  (c') balance stage end to end: {rate(len(texts), s):.1f} texts/s ({s:.2f}s over {args.shards} shards: "
              f"partial {stats['partial']:.2f}s, reduce {stats['reduce']:.2f}s, apply {stats['apply']:.2f}s; "
              f"kept {stats['kept']} of {len(texts)})")
        print(f"  ratio (c' per-text passes, partial + apply)/(b) = {per_text / r_up:.2f}x  (goal >= 1.2)")
        result["stage"] = per_text
    return result


def shipping(matcher: Matcher) -> None:
    t0 = time.perf_counter()
    blob = pickle.dumps(matcher)
    pickle.loads(blob)
    print(f"  ship: pickle round trip {time.perf_counter() - t0:.2f}s ({len(blob) / 1e6:.1f} MB: the entries, "
          f"rebuilt on arrival)")


def stage_end_to_end(entries: list[str], texts: list[str], mode: str, n_shards: int) -> tuple[float, dict]:
    """The balance stage's own passes, as the engine runs them per shard (contract checks, the
    carried match column, the reduce), in this process: Ray's scheduling and parquet I/O left out."""
    import json
    import tempfile

    from recap.pipeline.stage import DROP, StageContext
    from recap.pipeline.steps import run_stage, with_carry
    from recap.stages.balance import BalanceConfig, BalanceStage

    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "metadata.json"
        meta.write_text(json.dumps(entries))
        t0 = time.perf_counter()
        cfg = BalanceConfig(metadata=str(meta), mode=mode, t=max(20, len(texts) // 5000))
        stage = BalanceStage(cfg, StageContext("bench", 0, "balance", tmp, n_inputs=len(texts)))
        stage.setup()  # once per worker, as the engine's actors do: the matcher is not built per shard
        setup_s = time.perf_counter() - t0
        uids = [f"{i:016x}" for i in range(len(texts))]
        bounds = np.linspace(0, len(texts), n_shards + 1).astype(int)
        shards = [pa.table({"uid": uids[lo:hi], "caption": texts[lo:hi]}) for lo, hi in zip(bounds[:-1], bounds[1:])]
        t0 = time.perf_counter()
        results = [run_stage(stage, sh, "partial")[1] for sh in shards]
        t1 = time.perf_counter()
        state = json.loads(json.dumps(stage.reduce([r[0] for r in results])))  # through JSON, as committed
        stage.reduce_outputs(state)
        t2 = time.perf_counter()
        kept = 0
        for sh, r in zip(shards, results):
            out, _ = run_stage(stage, with_carry(stage, sh, r[1]), "apply", state)
            kept += out.column(DROP).null_count
        t3 = time.perf_counter()
    return t3 - t0, {"setup": setup_s, "partial": t1 - t0, "reduce": t2 - t1, "apply": t3 - t2, "kept": kept}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", default="6000,500000", help="entry-list sizes, comma-separated")
    ap.add_argument("--modes", default="metaclip1,metaclip2")
    ap.add_argument("--texts", type=int, default=100_000)
    ap.add_argument("--naive-texts", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5, help="best of this many runs for (b), (c) and the stage")
    ap.add_argument("--stage", action="store_true", help="also time the balance stage end to end (partial, reduce, apply)")
    ap.add_argument("--shards", type=int, default=8, help="shards for --stage")
    args = ap.parse_args()
    sizes = [int(s) for s in args.entries.split(",")]
    modes = args.modes.split(",")

    results = []
    for size in sizes:
        rng = random.Random(args.seed)
        t0 = time.perf_counter()
        vocab = vocabulary(max(size // 2, 60_000), rng)
        entries = make_entries(vocab, size, rng)
        texts = make_texts(vocab, args.texts, args.seed)
        assert len(set(entries)) == len(entries), "upstream's automaton keeps one id per duplicated entry"
        print(f"data: {len(entries)} entries, {len(texts)} texts (mean {np.mean([len(t) for t in texts]):.0f} chars), "
              f"made in {time.perf_counter() - t0:.1f}s")
        for mode in modes:
            print(f"[{len(entries)} entries, {mode}]")
            results.append(run_one(entries, texts, mode, args))
        shipping(results[-1].pop("matcher"))
        for r in results:
            r.pop("matcher", None)
        gc.collect()

    print("\nsummary (texts/s; ratios against upstream's automaton, goal >= 1.5, stage >= 1.2):")
    print(f"  {'entries':>8} {'mode':<10} {'upstream':>10} {'match_arrow':>12} {'ratio':>6} {'match':>10} {'ratio':>6}"
          f" {'stage/text':>11} {'ratio':>6}  ids")
    for r in results:
        stage = f"{r['stage']:11.0f} {r['stage'] / r['up']:6.2f}" if r["stage"] else f"{'-':>11} {'-':>6}"
        print(f"  {r['entries']:>8} {r['mode']:<10} {r['up']:10.0f} {r['arrow']:12.0f} {r['arrow'] / r['up']:6.2f}"
              f" {r['list']:10.0f} {r['list'] / r['up']:6.2f} {stage}  {'same' if r['ok'] else 'DIFFER'}")
        record(f"MetaCLIP matching texts/s ({r['entries']} entries, {r['mode']})", r["arrow"] / r["up"], goal=">= 1.5",
               value=r["arrow"], baseline=r["up"], unit="texts/s", against="upstream's Aho-Corasick automaton",
               same_ids=r["ok"])
        if r["stage"]:
            record(f"balance stage texts/s ({r['entries']} entries, {r['mode']})", r["stage"] / r["up"], goal=">= 1.2",
                   value=r["stage"], baseline=r["up"], unit="texts/s", against="upstream's Aho-Corasick automaton")
    if not all(r["ok"] for r in results):
        print("ids differ from upstream's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
