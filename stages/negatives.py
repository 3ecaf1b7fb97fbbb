"""Hard negatives (a global stage): kNN image neighbours from the stored embeddings, and hard-negative
captions made by rules, by text kNN, and (when an earlier stage wrote them) by an LLM.

Reduce gathers the clip stage's ``image_emb`` / ``text_emb`` of every kept sample, builds a faiss
index over the images (``index.kind``: exact ``flat`` by default; ``ivf``, ``ivfpq`` or ``hnsw``
trained on a seeded sample for large data, see ``stages/knn.py``) and another over the texts, and
asks each sample for ``candidates`` neighbours. A candidate is a likely false negative, and is
left out, when (UniME / NegCLIP practice):

- its caption matches the sample's image better than the sample's own caption does by more than
  ``margin`` (cos(image_i, text_j) > cos(image_i, text_i) + margin);
- its image is a near-duplicate: cos(image_i, image_j) > 1 - ``near_dup_eps``, or perceptual
  hashes within ``phash_distance`` bits (a rescaled, recompressed copy a weak encoder may not put
  that close; the partial hashes each image once and carries the hash);
- it has the same caption (case and spacing aside);
- it is in the same group of ``group_column`` (when an earlier stage wrote one).

The nearest ``k`` survivors are ``hard_neg_uids`` with their image cosines ``hard_neg_sims``; the
nearest ``text_k`` surviving captions of the text index become ``knn_text`` negatives. Apply adds the
rule-based negatives of the caption and of each synthetic text (``stages/text_negatives.py``) and
the LLM's (``neg_text_llm`` / ``neg_type_llm``), each with its type in ``neg_type`` and, in
``neg_of``, the index into [caption] + syn_text of the text it negates. Every draw is seeded by
(job seed, uid); the kNN results are ordered by (similarity, uid), so the output never depends on
workers or shards. Samples without embeddings get no image negatives (a ``no_embedding`` note).

Scale: the reduce holds the embeddings (N x d float32: 2 GB per million at d = 512) and the
neighbour lists in its state; see the README for the sharded two-pass design at 1B.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from recap.pipeline import rng
from recap.pipeline.errors import UserError
from recap.pipeline.stage import IMAGE_COLUMN, GlobalStage, StageConfig
from recap.pipeline.stage_data import StageData
from recap.pipeline.verdicts import verdicts
from recap.stages.knn import IndexConfig, IndexTooSmall, build_index, check_trainable, search
from recap.stages.syn_texts import LLM_NEG_COLUMNS, SYN_COLUMNS, syn_texts, texts
from recap.stages.text_negatives import RULES, Lexicon, make_negatives

DEFAULT_WORDNET = "/usr/share/wordnet"


class NegativesConfig(StageConfig):
    k: int = Field(8, ge=0, description="image hard negatives per sample (hard_neg_uids)")
    text_k: int = Field(2, ge=0, description="captions of text-kNN neighbours per sample (neg_type knn_text)")
    candidates: int = Field(32, ge=1, description="neighbours fetched per query before false-negative filtering")
    margin: float = Field(0.1, ge=0, description="drop a candidate whose caption fits the sample's image better "
                                                 "than its own caption by more than this")
    near_dup_eps: float = Field(0.02, gt=0, lt=1, description="drop candidates with cosine > 1 - eps (near-duplicates)")
    phash_distance: int | None = Field(6, ge=0, le=32, description="drop candidates whose image's perceptual "
                                                                  "hash is within this many bits (a re-encoded, "
                                                                  "rescaled copy); null: no hashing")
    group_column: str = Field("dedup_group", description="drop candidates in the same group of this column, "
                                                         "when an earlier stage wrote it")
    rules: list[str] = Field(list(RULES), description=f"rule-based text negatives, in order: {', '.join(RULES)}")
    syn_rules: bool = Field(False, description="also apply the rules to each synthetic text (neg_of > 0)")
    llm: bool = Field(True, description="merge neg_text_llm / neg_type_llm when an earlier stage wrote them")
    wordnet: str | None = Field(DEFAULT_WORDNET, description="WordNet 3.0 directory (index.noun, data.noun) for "
                                                             "word classes and co-hyponyms; built-in lexicon without")
    index: IndexConfig = Field(default_factory=IndexConfig)

    @field_validator("rules")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if r not in RULES]
        if bad:
            raise ValueError(f"unknown rules {bad}; known: {list(RULES)}")
        return v


def _matrix(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows float32 [n, d], zeros where null, and the mask of usable rows) of an embedding column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool) if n else np.zeros(0, bool)
    if not present.any():
        return np.zeros((n, 0), np.float32), present
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        vals = arr.values.slice(arr.offset * d, n * d).to_numpy(zero_copy_only=False)
        out = np.asarray(vals, dtype=np.float32).reshape(n, d).copy()
    else:
        lists = arr.to_pylist()
        d = len(lists[int(np.argmax(present))])
        out = np.array([v if v is not None and len(v) == d else [0.0] * d for v in lists], np.float32)
    out[~present] = 0.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    good = present & np.isfinite(out).all(1) & (norms[:, 0] > 0)
    out[good] /= norms[good]
    out[~good] = 0.0
    return out, good


def _norm_caption(c: str | None) -> str:
    return " ".join((c or "").lower().split())


class NegativesStage(GlobalStage):
    name = "negatives"
    Config = NegativesConfig
    default_batch_size = 4096

    def reads(self) -> tuple[str, ...]:
        return ("caption", "image_emb", "text_emb") + ((IMAGE_COLUMN,) if self.config.phash_distance is not None else ())

    def carry(self) -> tuple[str, ...]:
        return ("neg_phash",) if self.config.phash_distance is not None else ()

    def optional_reads(self) -> tuple[str, ...]:
        return (self.config.group_column, *(c for c, _ in SYN_COLUMNS), *LLM_NEG_COLUMNS)

    def writes(self) -> tuple[str, ...]:
        return ("hard_neg_uids", "hard_neg_sims", "neg_text_short", "neg_type", "neg_of")

    def _check_index(self, n: int) -> None:
        try:
            check_trainable(self.config.index, n, f"{self.ctx.stage}.index")
        except IndexTooSmall as e:
            raise UserError(str(e)) from None

    def setup(self) -> None:
        # the planned input bounds what can reach this stage: an index that cannot be trained even
        # on all of it fails here, on the first shard, before any neighbour is searched
        if self.ctx.n_inputs:
            self._check_index(self.ctx.n_inputs)

    def partial(self, batch: pa.Table) -> Any:
        """The image's perceptual hash, computed once and carried to the reduce (8 bytes a sample)."""
        if self.config.phash_distance is None:
            return {"n": batch.num_rows}
        from recap.stages.near_duplicates import phash_bytes, to_i64

        hashes = []
        for data in batch.column(IMAGE_COLUMN).to_pylist():
            h, _ = phash_bytes(data)
            hashes.append(None if h is None else to_i64(h))
        return {"n": batch.num_rows}, pa.table({"uid": batch.column("uid"), "neg_phash": pa.array(hashes, pa.int64())})

    # -- reduce ---------------------------------------------------------------------------------

    def reduce(self, partials: list[Any]) -> dict:
        cfg: NegativesConfig = self.config
        uids, captions, groups, imgs, txts, hashes = [], [], [], [], [], []
        for shard in range(self.data.n_shards):
            t = self.data.inputs(shard, ["caption", "image_emb", "text_emb"])
            if not t.num_rows:
                continue
            uids.extend(t.column("uid").to_pylist())
            captions.extend(_norm_caption(c) for c in t.column("caption").to_pylist())
            groups.extend(t.column(cfg.group_column).to_pylist() if cfg.group_column in t.column_names
                          else [None] * t.num_rows)
            imgs.append(t.column("image_emb"))
            txts.append(t.column("text_emb"))
            if cfg.phash_distance is not None:
                carried = self.data.carried(shard, ["uid", "neg_phash"])
                if carried.column("uid").to_pylist() != t.column("uid").to_pylist():
                    raise RuntimeError(f"shard {shard}: carried hashes do not line up with the input rows")
                hashes.extend(carried.column("neg_phash").to_pylist())
        n = len(uids)
        summary: dict[str, Any] = {"samples": n, "index": cfg.index.kind}
        if not n:
            return {"neighbours": {}, "text_neighbours": {}, "summary": summary}
        img, ok_i = _matrix(pa.chunked_array(imgs))
        txt, ok_t = _matrix(pa.chunked_array(txts))
        ok = ok_i & ok_t if txt.shape[1] == img.shape[1] else ok_i & False
        rows = np.nonzero(ok)[0]
        summary["embedded"] = int(len(rows))
        if len(rows) < 2:
            return {"neighbours": {}, "text_neighbours": {}, "summary": summary}
        self._check_index(len(rows))
        I, T = img[rows], txt[rows]
        ruid = np.array(uids, dtype=object)[rows]
        rcap = [captions[r] for r in rows]
        rgrp = [groups[r] for r in rows]
        rhash = [hashes[r] for r in rows] if hashes else [None] * len(rows)
        pos = np.einsum("ij,ij->i", I.astype(np.float64), T.astype(np.float64))
        kq = min(cfg.candidates, len(rows) - 1)
        use_gpu = self.resources.gpus > 0
        where = f"{self.ctx.stage}.index"
        self_ids = np.arange(len(rows))
        dropped = {"margin": 0, "near_duplicate": 0, "perceptual_duplicate": 0, "same_caption": 0, "same_group": 0}

        def keep(i: int, j: int, same_modal_sim: float) -> bool:
            if same_modal_sim > 1.0 - cfg.near_dup_eps:
                dropped["near_duplicate"] += 1
                return False
            if rhash[i] is not None and rhash[j] is not None \
                    and int(np.bitwise_count(np.uint64((rhash[i] ^ rhash[j]) & 0xFFFFFFFFFFFFFFFF))) <= cfg.phash_distance:
                dropped["perceptual_duplicate"] += 1
                return False
            if rcap[j] == rcap[i]:
                dropped["same_caption"] += 1
                return False
            if rgrp[i] is not None and rgrp[i] == rgrp[j]:
                dropped["same_group"] += 1
                return False
            if float(I[i].astype(np.float64) @ T[j].astype(np.float64)) > pos[i] + cfg.margin:
                dropped["margin"] += 1
                return False
            return True

        neighbours: dict[str, list] = {}
        if cfg.k:
            index = build_index(I, cfg.index, self.ctx.seed, where, use_gpu)
            ids, sims = search(index, I, I, kq, exclude_self=self_ids, rerank=cfg.index.rerank)
            for i in range(len(rows)):
                got = [(ruid[j], round(float(s), 6)) for j, s in zip(ids[i], sims[i])
                       if j >= 0 and keep(i, int(j), float(s))][:cfg.k]
                neighbours[ruid[i]] = [[u for u, _ in got], [s for _, s in got]]
        text_neighbours: dict[str, list] = {}
        if cfg.text_k:
            index = build_index(T, cfg.index, self.ctx.seed, where, use_gpu)
            ids, sims = search(index, T, T, kq, exclude_self=self_ids, rerank=cfg.index.rerank)
            for i in range(len(rows)):
                got, seen = [], set()
                for j, s in zip(ids[i], sims[i]):
                    if j < 0 or rcap[j] in seen or not keep(i, int(j), float(s)):
                        continue
                    seen.add(rcap[j])
                    got.append(ruid[j])
                    if len(got) == cfg.text_k:
                        break
                text_neighbours[ruid[i]] = got
        # captions of the text neighbours, verbatim (apply sees only its own shard)
        wanted = {u for v in text_neighbours.values() for u in v}
        raw = {}
        for shard in range(self.data.n_shards) if wanted else ():
            t = self.data.inputs(shard, ["caption"])
            for u, c in zip(t.column("uid").to_pylist(), t.column("caption").to_pylist()):
                if u in wanted:
                    raw[u] = c
        text_neighbours = {u: [raw[x] for x in v] for u, v in text_neighbours.items()}
        got = [len(v[0]) for v in neighbours.values()]
        summary.update({"false_negatives_dropped": dropped, "mean_hard_negatives": round(float(np.mean(got)), 3)
                        if got else 0.0, "without_hard_negatives": int(sum(1 for x in got if x == 0))})
        return {"neighbours": dict(sorted(neighbours.items())), "text_neighbours": dict(sorted(text_neighbours.items())),
                "summary": summary}

    # -- apply ----------------------------------------------------------------------------------

    def _lexicon(self) -> Lexicon:
        lex = getattr(self, "_lex", None)
        if lex is None:
            lex = self._lex = Lexicon(self.config.wordnet)
        return lex

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        cfg: NegativesConfig = self.config
        nb, tnb = state["neighbours"], state["text_neighbours"]
        skip = ("image_emb", "text_emb", IMAGE_COLUMN, "neg_phash")
        cols = {c: batch.column(c).to_pylist() for c in batch.column_names if c not in skip}
        rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
        lex = self._lexicon() if cfg.rules else None
        out = {k: [] for k in self.writes()}
        notes: list[str | None] = []
        for row in rows:
            uid = row["uid"]
            hn = nb.get(uid)
            out["hard_neg_uids"].append(hn[0] if hn else [])
            out["hard_neg_sims"].append(hn[1] if hn else [])
            notes.append(None if hn is not None or not cfg.k else "no_embedding")
            g = rng.generator(self.ctx.seed, f"{self.ctx.stage}/text", uid)
            syn, _ = syn_texts(row)
            sources = [row.get("caption") or ""] + (syn if cfg.syn_rules else [])
            negs: list[tuple[str, str, int]] = []
            seen = {_norm_caption(t) for t in [row.get("caption")] + syn}
            for k, text in enumerate(sources):
                for neg, typ in (make_negatives(text, cfg.rules, g, lex) if lex else []):
                    negs.append((neg, typ, k))
            for t in tnb.get(uid, []):
                negs.append((t, "knn_text", 0))
            if cfg.llm:
                llm = texts(row.get("neg_text_llm"))
                types = row.get("neg_type_llm") if isinstance(row.get("neg_type_llm"), list) else []
                for k, t in enumerate(llm):
                    typ = types[k] if k < len(types) and isinstance(types[k], str) and types[k] else "llm"
                    negs.append((t, typ if typ.startswith("llm") else f"llm_{typ}", 0))
            keep_negs = []
            for neg, typ, k in negs:
                key = _norm_caption(neg)
                if key and key not in seen:
                    seen.add(key)
                    keep_negs.append((neg, typ, k))
            out["neg_text_short"].append([n for n, _, _ in keep_negs])
            out["neg_type"].append([t for _, t, _ in keep_negs])
            out["neg_of"].append([k for _, _, k in keep_negs])
        columns = {
            "hard_neg_uids": pa.array(out["hard_neg_uids"], pa.list_(pa.string())),
            "hard_neg_sims": pa.array(out["hard_neg_sims"], pa.list_(pa.float32())),
            "neg_text_short": pa.array(out["neg_text_short"], pa.list_(pa.string())),
            "neg_type": pa.array(out["neg_type"], pa.list_(pa.string())),
            "neg_of": pa.array(out["neg_of"], pa.list_(pa.int32())),
        }
        return verdicts(batch.column("uid"), columns, note=notes)

    # -- recap inspect --------------------------------------------------------------------------

    @classmethod
    def summarize(cls, data: StageData) -> dict | None:
        if not data.has_state():
            return None
        summary = dict(data.state().get("summary", {}))
        types: dict[str, int] = {}
        with_neg = total = 0
        for shard in range(data.n_shards):
            t = data.kept(shard, ["neg_type"])
            if t is None:
                continue
            for v in t.column("neg_type").to_pylist():
                total += 1
                with_neg += bool(v)
                for x in v or []:
                    types[x] = types.get(x, 0) + 1
        summary["text_negative_types"] = dict(sorted(types.items()))
        summary["with_text_negatives"] = with_neg
        summary["kept"] = total
        return summary

    @classmethod
    def summary_lines(cls, s: dict) -> list[str]:
        fn = ", ".join(f"{k} {v}" for k, v in s.get("false_negatives_dropped", {}).items())
        types = ", ".join(f"{k} {v}" for k, v in s.get("text_negative_types", {}).items())
        return [f"  {cls.name}: {s.get('embedded', 0)} of {s.get('samples', 0)} samples embedded, {s.get('index')} "
                f"index, {s.get('mean_hard_negatives', 0)} image hard negatives per sample; false negatives dropped: "
                f"{fn or 'none'}",
                f"    text negatives on {s.get('with_text_negatives', 0)} of {s.get('kept', 0)}: {types or 'none'}"]
