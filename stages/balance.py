"""MetaCLIP balancing (global): match texts against metadata entries, count each entry once per text
over the whole dataset, and keep a text with probability P = 1 − ∏(1 − min(1, t / count[e])).

partial → per-shard sparse entry counts (per language too) and a uid-seeded uniform sample of
match sets; reduce → ``entry_counts.json`` (MetaCLIP's dict), t (given, or solved from
``target_size`` on the sample), per-language t (MetaCLIP 2); apply → ``matched_entries`` and
``balance_prob``, kept iff u < P with u drawn from (seed, "balance", uid).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from recap.pipeline import rng
from recap.pipeline.stage import GlobalStage, LocalPath, StageConfig
from recap.pipeline.stage_data import StageData
from recap.pipeline.verdicts import verdicts


class BalanceConfig(StageConfig):
    metadata: LocalPath = Field(..., description="MetaCLIP metadata.json (a JSON list of entries; local path or fsspec URL)")
    mode: Literal["metaclip1", "metaclip2"] = "metaclip1"
    t: float | None = Field(None, gt=0, description="MetaCLIP's threshold (20k for 400M of 1.6B)")
    target_size: int | None = Field(None, gt=0, description="solve t so that about this many samples are kept")
    text_column: str = Field("caption", description="the text to match: alt-text by default, any column (a recaption)")
    per_language: bool = Field(False, description="MetaCLIP 2: a threshold per language, from `language_column`")
    language_column: str = "lang"
    english: str = Field("en", description="the language whose tail share sets the other languages' thresholds")
    drop: bool = Field(True, description="False keeps every matched sample with its balance_prob, for online balancing")
    solve_sample: int = Field(200_000, ge=1, description="match sets (whole dataset) sampled to solve t from target_size")

    @field_validator("metadata")
    @classmethod
    def _metadata_loads(cls, v: str) -> str:
        # A local file is checked when the job is loaded, not on the first shard of a running job.
        # (Remote URLs are read by the workers.)
        if "://" not in v:
            from recap.metadata import MetadataError, load_entries

            try:
                load_entries(v)
            except MetadataError as e:
                raise ValueError(str(e)) from None
            # absolute, so workers whose working directory differs (a Ray cluster) read the same file
            v = str(Path(v).resolve())
        return v

    @model_validator(mode="after")
    def _one_threshold(self) -> BalanceConfig:
        if (self.t is None) == (self.target_size is None):
            raise ValueError("set exactly one of t and target_size")
        return self


def _flat(matches: pa.ListArray) -> np.ndarray:
    return matches.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _sparse_counts(matches: pa.ListArray) -> dict[str, list[int]]:
    """Match sets are unique per text, so counting flattened ids counts each entry once per text.
    Sparse as two lists (ids, counts): compact in JSON at 500k entries, and quick to densify."""
    ids, n = np.unique(_flat(matches), return_counts=True)
    return {"ids": ids.tolist(), "n": n.tolist()}


def _sparse(dense: np.ndarray) -> dict[str, list[int]]:
    ids = np.nonzero(dense)[0]
    return {"ids": ids.tolist(), "n": dense[ids].tolist()}


def _dense(sparse: dict[str, list[int]], n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    if sparse and sparse["ids"]:
        np.add.at(out, np.asarray(sparse["ids"], np.int64), np.asarray(sparse["n"], np.int64))
    return out


def _total(state: dict) -> np.ndarray:
    n = int(state["n_entries"])
    return np.sum([_dense(c, n) for c in state["counts"].values()], axis=0) if state["counts"] else np.zeros(n, np.int64)


TOP_NAMES = 100  # entries whose names the state keeps for `recap inspect` (the whole list is metadata.json)


class BalanceStage(GlobalStage):
    name = "balance"
    Config = BalanceConfig
    version = "2"  # sparse counts as (ids, n) lists; matches carried from partial to apply

    def reads(self) -> tuple[str, ...]:
        cfg: BalanceConfig = self.config
        return (cfg.text_column, cfg.language_column) if cfg.per_language else (cfg.text_column,)

    def writes(self) -> tuple[str, ...]:
        return ("matched_entries", "balance_prob")

    def carry(self) -> tuple[str, ...]:
        return ("matched_entries",)  # matched once, in the partial pass; apply gets the column back

    def setup(self) -> None:
        from recap.metadata import Matcher, load_entries

        self.entries = load_entries(self.config.metadata)
        self.matcher = Matcher(self.entries, mode=self.config.mode)
        self._probs: dict[str, np.ndarray] = {}

    def _matches(self, batch: pa.Table) -> pa.ListArray:
        name = self.config.text_column
        col = batch.column(name)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            # bytes that are not UTF-8 still match on what decodes (U+FFFD for the rest)
            col = pa.array([None if b is None else b.decode("utf-8", "replace") for b in col.to_pylist()], pa.string())
        elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            try:
                col = pc.cast(col, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ValueError(f"balance.text_column {name!r} is {col.type}, not text") from None
        return self.matcher.match_arrow(col)

    def _langs(self, batch: pa.Table) -> np.ndarray:
        cfg: BalanceConfig = self.config
        if not cfg.per_language:
            return np.full(batch.num_rows, cfg.english, dtype=object)
        return np.asarray([v or "und" for v in batch.column(cfg.language_column).to_pylist()], dtype=object)

    # -- global stage hooks ---------------------------------------------------------------------
    def partial(self, batch: pa.Table) -> dict:
        cfg: BalanceConfig = self.config
        matches = self._matches(batch)
        langs = self._langs(batch)
        counts = {}
        for lang in sorted(set(langs.tolist())):
            rows = np.nonzero(langs == lang)[0]
            counts[lang] = _sparse_counts(matches if len(rows) == len(langs) else matches.take(pa.array(rows)))
        sample = []
        if cfg.target_size is not None:
            # A uniform sample of the whole dataset (same rate in every shard, drawn by uid), big
            # enough to solve t for a target size at any scale without shipping every match set.
            rate = min(1.0, cfg.solve_sample / self.ctx.n_inputs) if self.ctx.n_inputs else 1.0
            u = rng.uniform(self.ctx.seed, "balance.sample", batch.column("uid").to_pylist())
            sample = matches.take(pa.array(np.nonzero(u < rate)[0], pa.int64())).to_pylist()
        summary = {"n": batch.num_rows, "counts": counts, "sample": sample}
        return summary, pa.table({"uid": batch.column("uid"), "matched_entries": matches.cast(pa.list_(pa.int32()))})

    def reduce(self, partials: list[dict]) -> dict:
        from recap.metadata import language_threshold, solve_threshold

        cfg: BalanceConfig = self.config
        n_entries = len(self.entries)
        total_n = sum(p["n"] for p in partials)
        lang_counts: dict[str, np.ndarray] = {}
        for p in partials:
            for lang, sparse in p["counts"].items():
                lang_counts[lang] = lang_counts.get(lang, np.zeros(n_entries, np.int64)) + _dense(sparse, n_entries)
        counts = np.sum(list(lang_counts.values()), axis=0) if lang_counts else np.zeros(n_entries, np.int64)
        t = cfg.t
        if t is None:
            sample = [ids for p in partials for ids in p["sample"]]
            scale = len(sample) / total_n if total_n else 1.0
            t = float(solve_threshold(sample, counts, cfg.target_size * scale))
        t_lang = {}
        if cfg.per_language:
            english = lang_counts.get(cfg.english, np.zeros(n_entries, np.int64))
            for lang, c in sorted(lang_counts.items()):
                t_lang[lang] = float(t) if lang == cfg.english else float(language_threshold(english, c, t))
        return {
            "t": float(t),
            "t_lang": t_lang,
            "samples": total_n,
            "n_entries": n_entries,
            "counts": {lang: _sparse(c) for lang, c in sorted(lang_counts.items())},
            "names": {str(i): self.entries[i] for i in np.argsort(-counts, kind="stable")[:TOP_NAMES] if counts[i]},
        }

    def reduce_outputs(self, state: dict) -> dict[str, bytes]:
        # MetaCLIP's entry_counts: {entry: count} over every entry (zeros too), in entry order;
        # a duplicated entry has one key (its copies match the same texts, so the same count).
        counts = _total(state)
        full = dict(zip(self.entries, counts.tolist()))
        return {"entry_counts.json": json.dumps(full, ensure_ascii=False).encode()}

    def _entry_probs(self, state: dict, lang: str) -> np.ndarray:
        from recap.metadata import entry_probabilities

        cfg: BalanceConfig = self.config
        key = lang if cfg.per_language else "*"
        if key not in self._probs:
            n = len(self.entries)
            if cfg.per_language:
                counts, t = _dense(state["counts"].get(lang, {}), n), state["t_lang"].get(lang, state["t"])
            else:
                counts = _total(state)
                t = state["t"]
            self._probs[key] = entry_probabilities(counts, t)
        return self._probs[key]

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        from recap.metadata import keep_probabilities

        cfg: BalanceConfig = self.config
        if "matched_entries" in batch.column_names:  # carried from the partial pass
            matches = batch.column("matched_entries").combine_chunks()
        else:
            matches = self._matches(batch)
        langs = self._langs(batch)
        probs = np.zeros(batch.num_rows, dtype=np.float64)
        for lang in sorted(set(langs.tolist())):
            rows = np.nonzero(langs == lang)[0]
            subset = matches if len(rows) == len(langs) else matches.take(pa.array(rows))
            probs[rows] = keep_probabilities(subset, self._entry_probs(state, lang))
        has_match = pc.greater(pc.list_value_length(matches), 0).to_numpy(zero_copy_only=False)
        u = rng.uniform(self.ctx.seed, "balance", batch.column("uid").to_pylist())
        kept = has_match & ((u < probs) | (not cfg.drop))
        drops = np.where(has_match, "balanced_out", "no_metadata_match").astype(object)
        drops[kept] = None
        details = [None if d != "balanced_out" else f"P={p:.4g} u={x:.4g}" for d, p, x in zip(drops, probs, u)]
        return verdicts(batch.column("uid"), {"matched_entries": matches.cast(pa.list_(pa.int32())),
                                              "balance_prob": pa.array(probs, pa.float64())},
                        drop=drops.tolist(), detail=details)

    # -- recap inspect --------------------------------------------------------------------------
    @classmethod
    def summarize(cls, data: StageData) -> dict | None:
        if not data.has_state():
            return None
        state = data.state()
        n, t = int(state["n_entries"]), float(state["t"])
        before = _total(state)
        tail = (before > 0) & (before < t)
        after = np.zeros(n, np.int64)
        samples = {"before": [0, 0], "after": [0, 0]}  # [samples with a match, of which with a tail entry]
        for shard in range(data.n_shards):
            for when, table in (("before", data.carried(shard, ["matched_entries"])),
                                ("after", data.kept(shard, ["matched_entries"]))):
                if table is None:
                    continue
                m = table.column("matched_entries").combine_chunks()
                matched, in_tail = _tail_samples(m, tail)
                samples[when][0] += matched
                samples[when][1] += in_tail
                if when == "after":
                    after += np.bincount(_flat(m), minlength=n)[:n]
        names = {int(i): e for i, e in state["names"].items()}
        out = entry_distribution_summary(before, after, t, names, samples["after"][0])
        for when, (matched, in_tail) in samples.items():
            out[when]["samples_matched"] = matched
            # MetaCLIP's point: a tail concept's samples all stay, so their share grows
            out[when]["samples_in_tail"] = round(in_tail / matched, 4) if matched else 0.0
        return out

    @classmethod
    def summary_lines(cls, summary: dict) -> list[str]:
        b, a = summary["before"], summary["after"]
        lines = [f"  {cls.name}: entry counts before -> after (t = {summary['t']:g})"]
        for key in ("matches", "entries_matched", "max_count", "head_share", "tail_share", "flatness",
                    "samples_matched", "samples_in_tail"):
            if key in b and key in a:
                lines.append(f"      {key:<16} {b[key]!s:>10} -> {a[key]!s:<10}")
        buckets = sorted(set(b["count_histogram"]) | set(a["count_histogram"]),
                         key=lambda k: int(k.split("-")[0].rstrip("+")))
        lines.append("      entries by count: " + "  ".join(
            f"{k}: {b['count_histogram'].get(k, 0)}->{a['count_histogram'].get(k, 0)}" for k in buckets))
        lines.append("      top entries: " + ", ".join(
            f"{e['entry']!r} {e['before']}->{e['after']}" for e in summary["top_entries"]))
        return lines


def _tail_samples(matches: pa.ListArray, tail: np.ndarray) -> tuple[int, int]:
    """(samples with any match, samples with at least one tail entry)."""
    lengths = pc.list_value_length(matches).to_numpy(zero_copy_only=False)
    lengths = np.nan_to_num(lengths.astype(float), nan=0).astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    has_tail = np.bincount(rows, weights=tail[_flat(matches)], minlength=len(lengths)) > 0
    return int((lengths > 0).sum()), int(has_tail.sum())


def entry_distribution_summary(before: np.ndarray, after: np.ndarray, t: float, names: dict, kept_matched: int) -> dict:
    """The head/tail effect: how matches spread over entries before and after balancing."""
    def dist(c: np.ndarray) -> dict:
        total = int(c.sum())
        nz = c[c > 0]
        edges = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, np.inf]
        hist = {f"{int(lo)}+" if hi == np.inf else f"{int(lo)}-{int(hi) - 1}": int(((nz >= lo) & (nz < hi)).sum())
                for lo, hi in zip(edges[:-1], edges[1:]) if ((nz >= lo) & (nz < hi)).any()}
        p = nz / total if total else nz
        return {
            "matches": total,
            "entries_matched": int(len(nz)),
            "max_count": int(nz.max()) if len(nz) else 0,
            "head_share": round(float(c[c >= t].sum() / total), 4) if total else 0.0,
            "tail_share": round(float(c[(c > 0) & (c < t)].sum() / total), 4) if total else 0.0,
            # normalised entropy of the match distribution: 1 = perfectly flat over matched entries
            "flatness": round(float(-(p * np.log(p)).sum() / np.log(len(nz))), 4) if len(nz) > 1 else 1.0,
            "count_histogram": hist,
        }

    top = np.argsort(-before, kind="stable")[:10]
    return {
        "t": t,
        "kept_matched_samples": kept_matched,
        "before": dist(before),
        "after": dist(after),
        "top_entries": [{"entry": names.get(int(i)), "before": int(before[i]), "after": int(after[i])}
                        for i in top if before[i] > 0],
    }
