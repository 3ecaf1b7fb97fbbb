"""Deduplication and decontamination across the whole dataset (a global stage). ``exact`` runs
first, then decontamination, then ``phash`` and ``semantic`` in the order ``methods`` lists them,
each on what the ones before left:

- ``exact``: samples whose stored image bytes hash the same; the smallest uid stays.
- ``phash``: perceptual hashes within ``phash_distance`` bits (multi-index hashing, never all
  pairs), each match confirmed on 32x32 colour thumbnails (root-mean-square difference at most
  ``phash_rmse``: luminance hashes of simple images collide across colours and shapes); confirmed
  pairs link into groups, whose smallest uid stays.
- ``semantic``: SemDeDup on the clip stage's ``image_emb`` (spherical k-means, then within each
  cluster an item leaves when its cosine to an item ordered before it exceeds ``1 - semantic_eps``).

With ``eval_set``, samples whose perceptual hash is within ``eval_distance`` bits of an image of the
evaluation set, as it is or padded to a square as the downloader's ``border`` mode stores a copy
(and whose thumbnail agrees, as above), leave first (``eval_contamination``), as DataComp removes near-duplicates of its
evaluation images. Every choice depends only on the data and the job seed, never on shard order or
worker count. Reasons: ``duplicate_image``, ``near_duplicate``, ``semantic_duplicate``,
``eval_contamination``; each detail names the kept uid.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from recap.pipeline.stage import IMAGE_COLUMN, GlobalStage, LocalPath, StageConfig
from recap.pipeline.stage_data import StageData
from recap.pipeline.verdicts import verdicts

Method = Literal["exact", "phash", "semantic"]


class DedupConfig(StageConfig):
    methods: list[Method] = Field(["exact"], description="exact, phash, semantic, run in this order")
    phash_distance: int = Field(6, ge=0, le=16, description="Hamming bits (of 64) within which two images "
                                                            "are near-duplicates")
    phash_rmse: float | None = Field(0.06, gt=0, le=1, description="confirm a hash match when the 32x32 "
                                     "colour thumbnails differ by at most this root-mean-square (0-1 scale); "
                                     "null trusts the hash alone")
    semantic_eps: float = Field(0.01, gt=0, lt=1, description="SemDeDup's eps: cosine > 1 - eps is a duplicate")
    clusters: int | None = Field(None, ge=1, description="k-means clusters; default sqrt(N)")
    keep: Literal["closest", "farthest"] = Field("farthest", description="which of a semantic group stays, "
                                                                         "by distance to its centroid")
    eval_set: LocalPath | None = Field(None, description="folder or tar of evaluation images to decontaminate "
                                                         "against")
    eval_distance: int | None = Field(None, ge=0, le=16, description="Hamming bits for eval_set; default "
                                                                     "max(8, phash_distance)")

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods lists one twice: {v}")
        return v

    @field_validator("eval_set")
    @classmethod
    def _has_images(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from recap.stages.eval_set import count_images

        v = str(Path(v).resolve())  # workers in another directory read the same files
        n = count_images(v)
        if n == 0:
            raise ValueError(f"no images in {v} (image files, or tars of them)")
        return v

    @model_validator(mode="after")
    def _something_to_do(self) -> DedupConfig:
        if not self.methods and self.eval_set is None:
            raise ValueError("methods is empty and there is no eval_set: nothing to do")
        return self


def _merge(into: dict[str, list], h: str, uid: str, n: int) -> None:
    if h in into:
        into[h] = [min(into[h][0], uid), into[h][1] + n]
    else:
        into[h] = [uid, n]


class DedupStage(GlobalStage):
    name = "dedup"
    Config = DedupConfig

    @property
    def _hashes(self) -> bool:
        return "phash" in self.config.methods or self.config.eval_set is not None

    def reads(self) -> tuple[str, ...]:
        methods = self.config.methods
        return (("sha256",) if "exact" in methods else ()) + ((IMAGE_COLUMN,) if self._hashes else ()) \
            + (("image_emb",) if "semantic" in methods else ())

    def carry(self) -> tuple[str, ...]:
        if not self._hashes:
            return ()
        return ("phash", "phash_skipped") + (("thumb",) if self.config.phash_rmse is not None else ())

    def partial(self, batch: pa.Table) -> Any:
        """sha256 -> [smallest uid, count] for this shard; with perceptual hashing, also each row's
        hash (carried: reduce reads them back, no image is decoded twice)."""
        seen: dict[str, list] = {}
        uids = batch.column("uid").to_pylist()
        if "exact" in self.config.methods:
            for uid, h in zip(uids, batch.column("sha256").to_pylist()):
                if h is not None:
                    _merge(seen, h, uid, 1)
        if not self._hashes:
            return seen
        from recap.stages.near_duplicates import perceptual_bytes, to_i64

        hashes, thumbs, skipped = [], [], []
        for data in batch.column(IMAGE_COLUMN).to_pylist():
            h, thumb, why = perceptual_bytes(data)
            hashes.append(None if h is None else to_i64(h))
            thumbs.append(thumb)
            skipped.append(why)
        carried = {"uid": batch.column("uid"), "phash": pa.array(hashes, pa.int64()),
                   "phash_skipped": pa.array(skipped, pa.string())}
        if self.config.phash_rmse is not None:
            carried["thumb"] = pa.array(thumbs, pa.binary())
        return seen, pa.table(carried)

    # -- reduce ---------------------------------------------------------------------------------

    def reduce(self, partials: list[Any]) -> dict:
        total: dict[str, list] = {}
        for part in partials:
            for h, (uid, n) in part.items():
                _merge(total, h, uid, n)
        exact = {h: uid for h, (uid, n) in sorted(total.items()) if n > 1}
        drops: dict[str, list] = {}
        summary: dict[str, Any] = {"methods": list(self.config.methods)}
        if self._hashes or "semantic" in self.config.methods:
            rows = self._rows(exact)
            alive = ~rows["exact_loser"]
            for method in (["eval"] if self.config.eval_set else []) + list(self.config.methods):
                if method == "phash":
                    summary["phash"] = self._near_duplicates(rows, alive, drops)
                elif method == "semantic":
                    summary["semantic"] = self._semantic(rows, alive, drops)
                elif method == "eval":
                    summary["eval"] = self._decontaminate(rows, alive, drops)
        counts: dict[str, int] = {}
        for reason, _ in drops.values():
            counts[reason] = counts.get(reason, 0) + 1
        summary["exact_groups"] = len(exact)
        summary["dropped"] = dict(sorted(counts.items()))
        return {"exact": exact, "drops": dict(sorted(drops.items())), "summary": summary}

    def _rows(self, exact: dict[str, str]) -> dict[str, np.ndarray]:
        """Every input row in shard order: uid, whether exact dedup removes it, its hash, its embedding."""
        uids, losers, hashes, valid, embs, offsets = [], [], [], [], [], []
        for shard in range(self.data.n_shards):
            offsets.append(len(uids))
            columns = (["sha256"] if "exact" in self.config.methods else []) \
                + (["image_emb"] if "semantic" in self.config.methods else [])
            table = self.data.inputs(shard, columns) if columns else None
            carried = self.data.carried(shard, ["uid", "phash"]) if self._hashes else None
            base = table if table is not None else carried
            if base is None:
                continue
            u = base.column("uid").to_pylist()
            uids.extend(u)
            if "exact" in self.config.methods:
                losers.extend(exact.get(h, uid) != uid for uid, h in zip(u, table.column("sha256").to_pylist()))
            else:
                losers.extend([False] * len(u))
            if carried is not None:
                if carried.column("uid").to_pylist() != u:
                    raise RuntimeError(f"shard {shard}: carried hashes do not line up with the input rows")
                col = carried.column("phash")
                valid.append(pc.is_valid(col).to_numpy(zero_copy_only=False))
                hashes.append(pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int64))
            if "semantic" in self.config.methods:
                embs.append(table.column("image_emb"))
        out = {"uid": np.array(uids, dtype=object), "exact_loser": np.array(losers, dtype=bool),
               "offsets": np.array(offsets + [len(uids)], dtype=np.int64)}
        if self._hashes:
            out["phash"] = (np.concatenate(hashes) if hashes else np.zeros(0, np.int64)).view(np.uint64)
            out["hashed"] = np.concatenate(valid).astype(bool) if valid else np.zeros(0, bool)
        if "semantic" in self.config.methods:
            out["emb"] = embs
        return out

    def _thumbnails(self, rows: dict, wanted: np.ndarray) -> dict[int, bytes]:
        """Carried thumbnails of the rows ``wanted`` (global row numbers) only: matches are few, so
        the reduce never holds every thumbnail at once."""
        wanted = np.unique(wanted)
        offsets = rows["offsets"]
        shard_of = np.searchsorted(offsets, wanted, side="right") - 1
        out: dict[int, bytes] = {}
        for shard in np.unique(shard_of).tolist():
            mine = wanted[shard_of == shard]
            col = self.data.carried(shard, ["thumb"]).column("thumb")
            for g, thumb in zip(mine.tolist(), col.take(pa.array(mine - offsets[shard])).to_pylist()):
                out[g] = thumb
        return out

    def _confirmed(self, a: list[bytes | None], b: list[bytes | None]) -> np.ndarray:
        """Whether each hash match is confirmed by its paired thumbnails (a missing one never is)."""
        from recap.stages.near_duplicates import thumbnail_rmse

        both = [x is not None and y is not None for x, y in zip(a, b)]
        rmse = np.full(len(a), np.inf, np.float32)
        at = np.nonzero(both)[0]
        rmse[at] = thumbnail_rmse([a[k] for k in at], [b[k] for k in at])
        return rmse <= self.config.phash_rmse

    # Each method below drops from ``alive`` (in place) what it removes, and says why in ``drops``.

    def _decontaminate(self, rows: dict, alive: np.ndarray, drops: dict) -> dict:
        from recap.stages.eval_set import iter_images
        from recap.stages.near_duplicates import hamming_pairs, perceptual_bytes

        names, hashes, thumbs, unreadable, images = [], [], [], 0, 0
        for name, data in iter_images(self.config.eval_set):
            h, thumb, _ = perceptual_bytes(data)
            if h is None:
                unreadable += 1
                continue
            images += 1
            # Each evaluation image also as the downloader's border mode stores a copy of it
            # (padded to a square with white): a letterboxed copy hashes far from the original.
            boxed, boxed_thumb, _ = perceptual_bytes(data, letterbox=True)
            for hv, tv in [(h, thumb)] + ([(boxed, boxed_thumb)] if boxed not in (None, h) else []):
                names.append(name)
                hashes.append(hv)
                thumbs.append(tv)
        # Looser than dedup by default: an evaluation set is small, so a wider search costs little,
        # and a missed copy leaks into the evaluation while an extra drop costs one sample.
        bits = self.config.eval_distance if self.config.eval_distance is not None \
            else max(8, self.config.phash_distance)
        pool = np.nonzero(alive & rows["hashed"])[0]
        q, j, d = hamming_pairs(rows["phash"][pool], bits, queries=np.array(hashes, dtype=np.uint64))
        unconfirmed = 0
        if self.config.phash_rmse is not None and len(q):
            theirs = self._thumbnails(rows, pool[j])
            ok = self._confirmed([thumbs[k] for k in q.tolist()], [theirs[g] for g in pool[j].tolist()])
            unconfirmed = int((~ok).sum())
            q, j, d = q[ok], j[ok], d[ok]
        best: dict[int, tuple[int, int]] = {}
        for qi, pj, dist in zip(q.tolist(), j.tolist(), d.tolist()):
            if pj not in best or (dist, qi) < best[pj]:
                best[pj] = (dist, qi)
        for pj, (dist, qi) in best.items():
            alive[pool[pj]] = False
            drops[rows["uid"][pool[pj]]] = ["eval_contamination",
                                            f"{dist} bits from evaluation image {names[qi]}"]
        return {"eval_images": images, "eval_unreadable": unreadable, "contaminated": len(best),
                "unconfirmed": unconfirmed}

    def _near_duplicates(self, rows: dict, alive: np.ndarray, drops: dict) -> dict:
        from recap.stages.near_duplicates import components, hamming_pairs

        idx = np.nonzero(alive & rows["hashed"])[0]
        h, uids = rows["phash"][idx], rows["uid"][idx]
        i, j, _ = hamming_pairs(h, self.config.phash_distance)
        unconfirmed = 0
        if self.config.phash_rmse is not None and len(i):
            thumbs = self._thumbnails(rows, np.concatenate([idx[i], idx[j]]))
            ok = self._confirmed([thumbs[g] for g in idx[i].tolist()], [thumbs[g] for g in idx[j].tolist()])
            unconfirmed = int((~ok).sum())
            i, j = i[ok], j[ok]
        label = components(len(idx), i, j)
        groups = 0
        order = np.lexsort((uids.astype(str), label))  # by group, then uid: a group's first is its winner
        lab = label[order]
        starts = np.r_[0, np.nonzero(lab[1:] != lab[:-1])[0] + 1]
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            if e - s < 2:
                continue
            groups += 1
            winner = order[s]
            for m in order[s + 1:e]:
                alive[idx[m]] = False
                dist = int(np.bitwise_count(h[m] ^ h[winner]))
                drops[uids[m]] = ["near_duplicate", f"kept {uids[winner]} of its near-duplicate group "
                                                    f"({dist} bits apart)"]
        return {"groups": groups, "skipped": int((alive & ~rows["hashed"]).sum()), "unconfirmed": unconfirmed}

    def _semantic(self, rows: dict, alive: np.ndarray, drops: dict) -> dict:
        from recap.stages.semdedup import semdedup

        emb = pa.chunked_array(rows["emb"]) if rows["emb"] else pa.chunked_array([], pa.list_(pa.float16()))
        present = pc.is_valid(emb).to_numpy(zero_copy_only=False).astype(bool) if len(emb) else np.zeros(0, bool)
        idx = np.nonzero(alive & present)[0]
        if not len(idx):
            return {"clusters": 0, "embedded": 0}
        flat = emb.take(pa.array(idx)).combine_chunks()
        dim = flat.type.list_size if pa.types.is_fixed_size_list(flat.type) else len(flat[0])
        vectors = flat.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(idx), dim)
        clusters = self.config.clusters or max(1, round(math.sqrt(len(idx))))
        res = semdedup(vectors, rows["uid"][idx], eps=self.config.semantic_eps, clusters=clusters,
                       keep=self.config.keep, seed=self.ctx.seed)
        uids = rows["uid"][idx]
        for m in np.nonzero(res.removed)[0].tolist():
            alive[idx[m]] = False
            drops[uids[m]] = ["semantic_duplicate",
                              f"kept {uids[res.kept_as[m]]}; cosine {res.similarity[m]:.4f} to "
                              f"{uids[res.nearest[m]]} in cluster {int(res.cluster[m])}"]
        return {"clusters": int(len(np.unique(res.cluster))), "embedded": len(idx)}

    # -- apply ----------------------------------------------------------------------------------

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        exact, gone = state["exact"], state["drops"]
        shas = batch.column("sha256").to_pylist() if "exact" in self.config.methods else [None] * batch.num_rows
        skipped = batch.column("phash_skipped").to_pylist() if self._hashes else [None] * batch.num_rows
        drops, details, notes = [], [], []
        for uid, sha, why in zip(batch.column("uid").to_pylist(), shas, skipped):
            winner = exact.get(sha) if sha is not None else None
            if winner is not None and winner != uid:
                drops.append("duplicate_image")
                details.append(f"same bytes as {winner}")
            elif uid in gone:
                drops.append(gone[uid][0])
                details.append(gone[uid][1])
            else:
                drops.append(None)
                details.append(why)  # the note's detail
            notes.append("phash_skipped" if why is not None and drops[-1] is None else None)
        return verdicts(batch.column("uid"), drop=drops, detail=details, note=notes)

    # -- recap inspect --------------------------------------------------------------------------

    @classmethod
    def summarize(cls, data: StageData) -> dict | None:
        if not data.has_state():
            return None
        state = data.state()
        return state.get("summary") if isinstance(state, dict) and "summary" in state else None

    @classmethod
    def summary_lines(cls, summary: dict) -> list[str]:
        parts = [f"methods {', '.join(summary['methods']) or 'none'}"]
        if "eval" in summary:
            e = summary["eval"]
            parts.append(f"{e['contaminated']} near {e['eval_images']} evaluation images")
        if "phash" in summary:
            p = summary["phash"]
            parts.append(f"{p['groups']} near-duplicate groups"
                         + (f" ({p['unconfirmed']} hash matches refused by their thumbnails)"
                            if p.get("unconfirmed") else ""))
        if "semantic" in summary:
            s = summary["semantic"]
            parts.append(f"{s['clusters']} clusters over {s['embedded']} embeddings")
        dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items())
        return [f"  {cls.name}: " + "; ".join(parts) + (f"; beyond exact: {dropped}" if dropped else "")]
