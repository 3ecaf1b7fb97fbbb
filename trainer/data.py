"""The trainer's data pipeline over reinforced shards (pipeline.reinforced), or plain img2dataset shards.

A plain-Python ``IterableDataset`` (no webdataset pipeline): the reader is pipeline.reinforced's
tolerant streaming tar reader, so the format has one definition, bad samples are counted rather
than fatal, and every random choice is a pure function of (seed, epoch, uid):

- shard order: a permutation seeded by (seed, epoch); shards split by rank, then by DataLoader
  worker. When there are fewer shards than ranks (or than workers in a rank), that level splits by
  sample position instead, so every sample is still read by exactly one (rank, worker).
- a shuffle buffer (seeded by (seed, epoch, rank, worker)) over the raw samples;
- online MetaCLIP balancing: a sample enters the epoch iff u(seed, epoch, uid) < json.balance_prob;
- the augmentation: one of the N_aug stored ``param_aug`` entries, chosen by u(seed, epoch, uid),
  replayed exactly as ml-mobileclip's ``reapply`` does (version-1 entries converted by the reader);
  the teacher image embedding is that entry's row;
- the text: GT, or one of [GT] + syn_text (per-source weights), chosen by u(seed, epoch, uid); the
  teacher text embedding is that text's row (0 = GT);
- plain shards (no config.json): GT text only, no teacher, and open_clip's training crop
  (RandomResizedCrop scale (0.9, 1), bicubic) drawn from (seed, epoch, uid) and replayed the same way.

So the stream of an epoch is reproducible (exact resume), whatever the machine.
"""
from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recap.pipeline import rng
from recap.pipeline.reinforced import (PLAIN_AUG, ReinforcedConfig, ReinforcedFormatError, check_param, decode_sample,
                                       find_config, iter_raw, list_shards, read_sizes, replay_augmentation,
                                       sample_param_aug)
from recap.trainer.tags import tag_ids

# open_clip.constants.OPENAI_DATASET_MEAN / _STD (copied: importing open_clip costs seconds per worker)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
STATS_KEY = "__stats__"


class DataError(ValueError):
    """Data that cannot train at all (no shards, wrong embedding width, teacher asked of plain data)."""


def _u(seed: int, what: str, epoch: int, uid: str) -> float:
    return float(rng.uniform(seed, f"train/{what}/{epoch}", [uid])[0])


class ReinforcedDataset(IterableDataset):
    """Samples as dicts: ``image`` [3, S, S] float, ``text`` (token ids [ctx], or the string without a
    tokenizer), ``uid``, ``aug_index`` (param_aug row replayed; -1 for a drawn plain crop),
    ``text_index`` (0 = GT, k = syn_text[k-1]), ``text_source``; with ``use_teacher``:
    ``teacher_image`` [D], ``teacher_text`` [D]; with ``hard_negatives``: ``neg_text`` [0..n, ctx]
    (``negatives_per_sample`` negatives, preferring those made from the chosen text) and with a
    teacher ``teacher_neg_text`` [0..n, D] (with ``long_negatives``, the chosen negative's ``neg_text_long``, or syn.json's
    ``long_negative``, is one more ``neg_text`` row); with ``tag_index`` (HQ-CLIP short tags): ``tag_pos`` and ``tag_neg``, lists of tag ids.

    ``stats`` counts skipped samples and damaged shards by reason (in the process that iterates;
    through ``make_loader`` worker counts are merged back at the end of each worker's stream)."""

    def __init__(self, urls: str | Sequence[str], *, epoch: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, image_transform: Callable | None = None, image_size: int = 224,
                 tokenizer: Callable | None = None, text_choice: str = "gt",
                 syn_weights: dict[str, float] | None = None, online_balance: bool = False,
                 use_teacher: bool = False, hard_negatives: bool = False, resampled: bool = False,
                 expected_dim: int | None = None, shuffle_buffer: int = 1000, shuffle_shards: bool = True,
                 samples_per_epoch: int | None = None, mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD, tag_index: dict[str, int] | None = None,
                 image_hard_negatives: int = 0, long_negatives: bool = False, negatives_per_sample: int = 1):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if text_choice not in ("gt", "uniform"):
            raise ValueError(f"text_choice must be 'gt' or 'uniform', got {text_choice!r}")
        if syn_weights is not None:
            bad = {k: v for k, v in syn_weights.items() if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v))}
            if bad:
                raise ValueError(f"syn_weights must be finite and >= 0, got {bad}")
        where = urls if isinstance(urls, str) else ", ".join(map(str, urls))
        self.shards = list_shards(urls)
        if not self.shards:
            raise DataError(f"no shards (*.tar) found at {where}: expected a reinforced dataset directory "
                            f"(config.json + shards/), a directory of .tar shards, or shard URLs")
        first = urls if isinstance(urls, str) else str(urls[0])
        self.config: ReinforcedConfig | None
        self.config, root = find_config(first)
        self.reinforced = self.config is not None
        self.sizes = read_sizes(root) if root else read_sizes(self.shards[0].rsplit("/", 1)[0])
        dim = self.config.dim if self.config else 0
        if use_teacher and not dim:
            raise DataError(f"{where}: use_teacher needs teacher embeddings, but "
                            + ("config.json lists no teachers" if self.config else
                               "these are plain shards (no config.json)"))
        if expected_dim is not None and dim and dim != expected_dim:
            names = ", ".join(f"{t.name}:{t.dim}" for t in self.config.teachers)
            raise DataError(f"{where}: teacher embeddings are {dim}-d ({names}) but the model expects "
                            f"{expected_dim}-d (expected_dim)")
        self.epoch, self.seed, self.rank, self.world_size = int(epoch), int(seed), int(rank), int(world_size)
        self.image_transform, self.image_size, self.tokenizer = image_transform, int(image_size), tokenizer
        self.text_choice, self.syn_weights = text_choice, dict(syn_weights) if syn_weights else None
        self.online_balance, self.use_teacher, self.hard_negatives = online_balance, use_teacher, hard_negatives
        self.resampled, self.expected_dim = resampled, expected_dim
        self.shuffle_buffer, self.shuffle_shards, self.samples_per_epoch = shuffle_buffer, shuffle_shards, samples_per_epoch
        self._mean, self._std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.tag_index = tag_index
        self.image_hard_negatives = int(image_hard_negatives)
        self.long_negatives = bool(long_negatives)
        if int(negatives_per_sample) < 1:
            raise ValueError(f"negatives_per_sample must be >= 1, got {negatives_per_sample}")
        self.negatives_per_sample = int(negatives_per_sample)
        self.required = ("jpg", "txt", "json") if self.reinforced else ("jpg", "txt")
        self.stats: Counter = Counter()

    # -- the stream -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self.iter_samples(self.stats)

    def _slot(self) -> tuple[int, int]:
        wi = get_worker_info()
        return (wi.id, wi.num_workers) if wi is not None else (0, 1)

    def _plan(self, worker: int, n_workers: int) -> tuple[list[str], Callable[[int], bool], bool]:
        """(this slot's shards in order, keep(position) filter, whether it counts shard damage)."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            order = [int(i) for i in rng.generator(self.seed, f"train/shards/{self.epoch}", "").permutation(len(order))]
        shards = [self.shards[i] for i in order]
        m1, r1, m2, r2 = 1, 0, 1, 0
        if len(shards) >= self.world_size:
            shards = shards[self.rank::self.world_size]
        else:
            m1, r1 = self.world_size, self.rank
        if len(shards) >= n_workers:
            shards = shards[worker::n_workers]
        else:
            m2, r2 = n_workers, worker

        def keep(p: int) -> bool:
            return p % m1 == r1 and (p // m1) % m2 == r2

        return shards, keep, r1 == 0 and r2 == 0

    def _raw(self, stats: Counter) -> Iterator[dict]:
        worker, n_workers = self._slot()
        if self.resampled:
            g = rng.generator(self.seed, f"train/resample/{self.epoch}", f"{self.rank}/{worker}")
            dry = 0  # consecutive draws that gave nothing: all shards bad would otherwise spin forever
            while dry < max(16, 4 * len(self.shards)):
                url = self.shards[int(g.integers(len(self.shards)))]
                got = 0
                for s in self._decode(iter_raw(url, stats, self._expected(url)), stats, lambda p: True):
                    got += 1
                    yield s
                dry = 0 if got else dry + 1
            stats["resampled_no_data"] += 1
            return
        shards, keep, count_damage = self._plan(worker, n_workers)
        pos = [0]
        for url in shards:
            yield from self._decode(iter_raw(url, stats, self._expected(url), count_damage), stats, keep, pos)

    def _expected(self, url: str) -> int | None:
        return self.sizes.get(url.rsplit("/", 1)[-1])

    def _decode(self, groups, stats: Counter, keep, pos: list[int] | None = None) -> Iterator[dict]:
        for key, members in groups:
            if pos is not None:
                p = pos[0]
                pos[0] += 1
                if not keep(p):
                    continue
            s = decode_sample(key, members, stats, self.required, self.config, decode_npz=self.use_teacher)
            if s is None:
                continue
            if self.online_balance:
                try:
                    prob = float(s["json"].get("balance_prob", 1.0))
                except (TypeError, ValueError):
                    prob = 1.0
                if not _u(self.seed, "balance", self.epoch, s["uid"]) < prob:
                    stats["balanced_out"] += 1
                    continue
            yield s

    def iter_samples(self, stats: Counter) -> Iterator[dict]:
        worker, _ = self._slot()
        g = rng.generator(self.seed, f"train/shuffle/{self.epoch}", f"{self.rank}/{worker}")
        budget = None
        if self.samples_per_epoch is not None:
            budget = math.ceil(self.samples_per_epoch / (self.world_size * self._slot()[1]))
        if self.image_hard_negatives:
            yield from self._iter_with_neighbours(stats, g, budget)
            return
        buf: list[dict] = []
        n = 0
        for s in self._raw(stats):
            if len(buf) < max(1, self.shuffle_buffer):
                buf.append(s)
                continue
            k = int(g.integers(len(buf)))
            s, buf[k] = buf[k], s
            out = self.prepare(s, stats)
            if out is not None:
                yield out
                n += 1
                if budget is not None and n >= budget:
                    return
        for k in g.permutation(len(buf)):
            out = self.prepare(buf[int(k)], stats)
            if out is not None:
                yield out
                n += 1
                if budget is not None and n >= budget:
                    return

    def _iter_with_neighbours(self, stats: Counter, g, budget: int | None) -> Iterator[dict]:
        """The shuffle buffer, but each drawn sample brings up to ``image_hard_negatives`` of its
        ``neg.hard_neg_uids`` (kNN image neighbours, nearest first) that are in the buffer right
        behind it, so they share its batch: image hard negatives (one level, never a sample twice).
        Neighbours outside this worker's buffer are not fetched; ``stats`` counts pulled and missed."""
        buf: list[dict] = []
        where: dict[str, int] = {}
        size = max(1, self.shuffle_buffer)

        def take(k: int) -> dict:
            s, last = buf[k], buf.pop()
            if k < len(buf):
                buf[k] = last
                where[last["uid"]] = k
            where.pop(s["uid"], None)
            return s

        def emit(s: dict) -> Iterator[dict]:
            out = self.prepare(s, stats)
            if out is None:
                return
            yield out
            neg = s.get("neg") if isinstance(s.get("neg"), dict) else {}
            uids = neg.get("hard_neg_uids") if isinstance(neg.get("hard_neg_uids"), list) else []
            pulled = 0
            for u in uids:
                if pulled >= self.image_hard_negatives:
                    break
                k = where.get(u) if isinstance(u, str) else None
                if k is None or buf[k]["uid"] != u:
                    stats["hard_neg_not_in_buffer"] += 1
                    continue
                nb = self.prepare(take(k), stats)
                if nb is not None:
                    pulled += 1
                    stats["hard_neg_pulled"] += 1
                    yield nb

        n = 0
        stream = self._raw(stats)
        while True:
            for s in stream:  # refill: neighbours taken out leave room
                where[s["uid"]] = len(buf)
                buf.append(s)
                if len(buf) > size:
                    break
            if not buf:
                return
            for out in emit(take(int(g.integers(len(buf))))):
                yield out
                n += 1
                if budget is not None and n >= budget:
                    return

    # -- one sample -----------------------------------------------------------------------------
    def _tokens(self, texts: list[str]):
        if self.tokenizer is None:
            return texts
        return self.tokenizer(texts)

    def prepare(self, s: dict, stats: Counter) -> dict | None:
        """Decode, augment and pick texts for one decoded sample; None (counted) if it cannot train."""
        from PIL import Image

        uid = s["uid"]
        txt = (s["txt"] or "").strip()
        if not txt:
            stats["empty_txt"] += 1
            return None
        try:
            with Image.open(io.BytesIO(s["jpg"])) as im:
                img = im.convert("RGB")
        except Exception:  # PIL raises many types for broken or hostile files
            stats["bad_image"] += 1
            return None
        paug = s["param_aug"] if self.reinforced else None
        if self.use_teacher and (not paug or s["image_emb"] is None or s["text_emb"] is None):
            stats["missing_teacher"] += 1
            return None
        try:
            if paug:
                k = min(int(_u(self.seed, "aug", self.epoch, uid) * len(paug)), len(paug) - 1)
                param, aug_cfg = paug[k], self.config.aug
                check_param(param, aug_cfg, f"sample {uid}: param_aug[{k}]")
            else:
                k, aug_cfg = -1, PLAIN_AUG
                param = sample_param_aug(img.width, img.height, aug_cfg, self.seed, uid, 1,
                                         stage=f"train/{self.epoch}")[0]
            pil = replay_augmentation(img, param, aug_cfg, size=self.image_size)
        except (ReinforcedFormatError, ValueError, TypeError, IndexError):
            stats["bad_paug"] += 1
            return None
        if self.image_transform is not None:
            image = self.image_transform(pil)
        else:
            # numpy, not torch: elementwise torch ops fan out to the intra-op thread pool, which costs
            # ~100x on a loaded machine when iterating in the main process (num_workers=0)
            arr = np.asarray(pil, dtype=np.float32) * np.float32(1 / 255.0)
            image = torch.from_numpy(np.ascontiguousarray(((arr - self._mean) / self._std).transpose(2, 0, 1)))

        texts, sources = [txt], ["gt"]
        syn = s.get("syn") or {}
        if self.reinforced and isinstance(syn.get("syn_text"), list):
            texts += [str(t) for t in syn["syn_text"]]
            src = syn.get("syn_source")
            sources += [str(x) for x in src] if isinstance(src, list) and len(src) == len(texts) - 1 \
                else ["syn"] * (len(texts) - 1)
        t = 0
        if self.text_choice == "uniform" and len(texts) > 1:
            w = np.array([(self.syn_weights.get(src, 1.0) if self.syn_weights else 1.0) for src in sources], float)
            w[[i for i in range(1, len(texts)) if not texts[i].strip()]] = 0.0
            if w.sum() > 0:
                cum = np.cumsum(w / w.sum())
                t = min(int(np.searchsorted(cum, _u(self.seed, "text", self.epoch, uid), side="right")), len(texts) - 1)
                while w[t] == 0:  # float edge: never land on a zero-weight text
                    t -= 1
        out: dict[str, Any] = {"image": image, "uid": uid, "aug_index": k, "text_index": t,
                               "text_source": sources[t]}
        tok = self._tokens([texts[t]])
        out["text"] = tok[0]
        if self.use_teacher:
            out["teacher_image"] = torch.from_numpy(np.asarray(s["image_emb"][k], dtype=np.float32))
            out["teacher_text"] = torch.from_numpy(np.asarray(s["text_emb"][t], dtype=np.float32))
        if self.tag_index is not None:
            out["tag_pos"], out["tag_neg"] = tag_ids(s.get("syn"), self.tag_index)
        if self.hard_negatives:
            neg = s.get("neg") or {}
            short = neg.get("neg_text_short") if isinstance(neg.get("neg_text_short"), list) else []
            cand = list(range(len(short)))
            if self.use_teacher and s["neg_text_emb"] is None:
                cand = []
            of = neg.get("neg_of")
            if cand and isinstance(of, list) and len(of) == len(short):
                mine = [i for i in cand if of[i] == t]
                cand = mine or cand
            chosen = self._pick_negatives(cand, uid)
            negs = [str(short[i]) for i in chosen]
            if self.long_negatives:  # HQ-CLIP: the long description's negative rides along
                longs = neg.get("neg_text_long")
                if isinstance(longs, list) and len(longs) == len(short):
                    negs += [str(longs[i]) for i in chosen if isinstance(longs[i], str) and longs[i].strip()]
                elif isinstance(syn.get("long_negative"), str) and syn["long_negative"].strip():
                    negs.append(syn["long_negative"])
            if self.tokenizer is None:
                out["neg_text"] = negs
            elif negs:
                out["neg_text"] = self._tokens(negs)
            else:
                out["neg_text"] = torch.zeros((0, tok.shape[-1]), dtype=tok.dtype)
            if self.use_teacher:
                d = self.config.dim
                out["teacher_neg_text"] = torch.from_numpy(np.asarray(s["neg_text_emb"][chosen], np.float32)) \
                    if chosen else torch.zeros((0, d))
        return out

    def _pick_negatives(self, cand: list[int], uid: str) -> list[int]:
        """Up to negatives_per_sample of the candidate negatives, drawn by (seed, epoch, uid); the
        first is the one a single-negative run draws, so raising the count only adds columns."""
        if not cand:
            return []
        first = cand[min(int(_u(self.seed, "neg", self.epoch, uid) * len(cand)), len(cand) - 1)]
        rest = [i for i in cand if i != first]
        if self.negatives_per_sample == 1 or not rest:
            return [first]
        keys = rng.uniform(self.seed, f"train/neg-order/{self.epoch}", [f"{uid}/{i}" for i in rest])
        order = [rest[j] for j in np.argsort(keys, kind="stable")]
        return [first, *order[:self.negatives_per_sample - 1]]


# -- batching -------------------------------------------------------------------------------------
RAGGED = ("neg_text", "teacher_neg_text")


def _stack(vals: list[torch.Tensor], cat: bool = False) -> torch.Tensor:
    """torch.stack/cat through numpy: a plain copy, without the intra-op thread pool (which, in a
    main process on a busy machine, made stacking a batch of images ~100x slower)."""
    if all(v.device.type == "cpu" and not v.requires_grad for v in vals):
        arrays = [v.numpy() for v in vals]
        return torch.from_numpy(np.concatenate(arrays) if cat else np.stack(arrays))
    return torch.cat(vals) if cat else torch.stack(vals)


def collate(samples: list[dict]) -> dict:
    """Stack tensors (and ints) of equal shape; concatenate the ragged negatives along dim 0 with
    ``neg_index`` (the batch row each negative belongs to); keep everything else as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if key in RAGGED:
            if torch.is_tensor(vals[0]):
                out[key] = _stack(vals, cat=True)
            else:
                out[key] = [x for v in vals for x in v]
        elif torch.is_tensor(vals[0]) and all(v.shape == vals[0].shape for v in vals):
            out[key] = _stack(vals)
        elif isinstance(vals[0], int) and not isinstance(vals[0], bool):
            out[key] = torch.tensor(vals, dtype=torch.long)
        else:
            out[key] = vals
    if "neg_text" in samples[0]:
        out["neg_index"] = torch.tensor([i for i, s in enumerate(samples) for _ in range(len(s["neg_text"]))],
                                        dtype=torch.long)
    return out


class _Batched(IterableDataset):
    """Batches inside the (worker) stream, so a worker's skip counts can follow its last batch."""

    def __init__(self, dataset: ReinforcedDataset, batch_size: int, drop_last: bool):
        super().__init__()
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last

    def __iter__(self) -> Iterator[dict]:
        in_worker = get_worker_info() is not None
        stats = Counter() if in_worker else self.dataset.stats
        batch: list[dict] = []
        for s in self.dataset.iter_samples(stats):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch)
        if in_worker and stats:
            yield {STATS_KEY: dict(stats)}


class ReinforcedLoader(DataLoader):
    """A DataLoader whose workers' skip counts end up in ``source.stats`` (the ReinforcedDataset)."""

    def __init__(self, dataset: ReinforcedDataset, batch_size: int, num_workers: int = 0, drop_last: bool = True,
                 **kw):
        self.source = dataset
        super().__init__(_Batched(dataset, batch_size, drop_last), batch_size=None, num_workers=num_workers, **kw)

    def __iter__(self):
        for batch in super().__iter__():
            if STATS_KEY in batch:
                self.source.stats.update(batch[STATS_KEY])
                continue
            yield batch


def make_loader(dataset: ReinforcedDataset, batch_size: int, num_workers: int = 0, drop_last: bool = True,
                pin_memory: bool | None = None, prefetch_factor: int | None = None) -> ReinforcedLoader:
    """Batches of ``batch_size`` from each worker in turn (drop_last by default: every rank then steps
    with full, equal batches). Tensors are stacked; ``uid``/``text_source`` stay lists."""
    kw: dict[str, Any] = {"pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory}
    if num_workers > 0:
        kw["prefetch_factor"] = prefetch_factor or 2
    return ReinforcedLoader(dataset, batch_size, num_workers, drop_last, **kw)
