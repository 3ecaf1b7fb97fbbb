"""Reinforce (a global stage): the job's end product, DataCompDR-compatible training shards with
teacher embeddings, in ``DATASET/<output>/`` (default ``reinforced/``) in the layout of
``recap.pipeline.reinforced``.

Partial, per shard, on an actor pool that keeps the teachers loaded (a GPU each when the stage's
resources ask for one): each kept sample's image is decoded, ``aug.n_aug`` augmentations are
sampled from (job seed, stage, uid) and replayed with ``replay_augmentation`` (the one function the
trainer replays with), and every teacher embeds the replayed crops (its own eval transform on the
crop) and all texts: the caption, the synthetic texts (``syn_text``, in ``stages/syn_texts.py``'s
order) and the negatives' ``neg_text_short``. Each teacher's slice is L2-normalised and the
slices are concatenated in the config's order. The sample's members (jpg, txt, url.txt, json,
paug.json, syn.json, neg.json, npz or pth.gz) make one tar per shard, published with the partial:
a rerun redoes a shard whose tar is missing or cut short, so no tar is ever half-written.

Reduce checks that every shard saw the same teacher dims, then publishes ``config.json``,
``sizes.json`` (also ``shards/sizes.json``, where open_clip looks) and ``manifest.jsonl``. With
``samples_per_shard`` or ``shuffle`` the partials' tars go to ``parts/`` and the reduce re-packs
them into output tars of that size, in pipeline order or ordered by a hash of (job seed, uid).
``config.json``'s generators come from the job's recaption and rewrite configs. Apply keeps or
drops each sample as the partial decided.

Every earlier column is optional except the image and the caption: a job without recaptioning
writes no syn.json, one without the negatives stage no neg.json. A sample that lacks a column
an earlier stage of the job wrote (a recaption whose LLM call failed) is written with what it
has and noted in the ledger (``missing_<column>``). Drops: ``decode_error`` (the image does not
decode here), ``nonfinite_embedding`` (a teacher gave NaN or inf).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recap.models.encoders import EncoderError, EncoderSpec, Precision
from recap.pipeline.errors import UserError
from recap.pipeline.reinforced import (AugConfig, ReinforcedConfig, TeacherConfig, encode_shard, index_files,
                                       replay_augmentation, sample_param_aug)
from recap.pipeline.reinforced.layout import SHARDS_DIR, shard_file
from recap.pipeline.rng import uniform
from recap.pipeline.shards import read_tar, write_tar
from recap.pipeline.stage import IMAGE_COLUMN, GlobalStage, StageConfig
from recap.pipeline.stage_data import StageData
from recap.pipeline.verdicts import verdicts
from recap.stages.syn_texts import HQ_COLUMNS, LLM_NEG_COLUMNS, SYN_COLUMNS, syn_texts, texts

PARTS_DIR = "parts"
NEG_COLUMNS = ("hard_neg_uids", "hard_neg_sims", "neg_text_short", "neg_type", "neg_of")
# earlier columns that go into the sample's json as they are
META_COLUMNS = ("lang", "lang_score", "matched_entries", "balance_prob", "dedup_group")
SCORE_COLUMNS = ("clip_score",)
_CARRY = ("reinforce_drop", "reinforce_detail", "reinforce_note")


class TeacherSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True, populate_by_name=True)
    model: str = Field(..., description="open_clip model name, bundled config (recap-tiny) or hf-hub:ORG/NAME")
    pretrained: str | None = Field(..., description="pretrained tag, checkpoint path or URL, or null (random init)")
    config_file: str | None = Field(None, alias="model_config", description="open_clip model-config JSON")

    @field_validator("config_file")
    @classmethod
    def _abs(cls, v: str | None) -> str | None:
        return str(Path(v).resolve()) if v and "://" not in v else v

    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.model, self.pretrained, self.config_file)

    def label(self) -> str:
        return self.model


class ReinforceConfig(StageConfig):
    teachers: list[TeacherSpec] = Field(..., min_length=1, description="the ensemble, in concatenation order")
    precision: Precision = Field("fp32", description="teachers' autocast: fp32, bf16 or fp16")
    aug: AugConfig = Field(default_factory=AugConfig, description="augmentations (DataCompDR's: 224 px, n_aug 10)")
    emb_dtype: Literal["float16", "float32", "bfloat16"] = Field(
        "float16", description="float16, float32, or bfloat16 (with emb_format pth.gz)")
    emb_format: Literal["npz", "pth.gz"] = Field("npz", description="npz, or DataCompDR's bf16 pth.gz")
    output: str = Field("reinforced", description="folder under the dataset that receives the reinforced dataset")
    encode_batch: int = Field(64, ge=1, description="samples per teacher forward pass")
    samples_per_shard: int | None = Field(
        None, ge=1, description="samples per output tar (the last one shorter); null: one tar per pipeline shard")
    shuffle: bool = Field(False, description="order the samples across the whole dataset by a hash of (job seed, "
                                             "uid) instead of the pipeline's order")
    generators: dict[str, Any] = Field(default_factory=dict,
                                       description="more generator provenance for config.json, beside what the job's "
                                                   "recaption and rewrite stages record (a key here replaces theirs; "
                                                   "each string prompt gets its sha256 beside it)")

    @field_validator("teachers")
    @classmethod
    def _teachers_load(cls, v: list[TeacherSpec]) -> list[TeacherSpec]:
        from recap.models.encoders import checked_spec

        out = []
        for k, t in enumerate(v):
            try:
                s = checked_spec(t.spec())
            except EncoderError as e:
                raise ValueError(f"teachers[{k}].{e.field}: {e}") from None
            out.append(TeacherSpec(model=s.model, pretrained=s.pretrained, model_config=s.model_config))
        return out

    @field_validator("output")
    @classmethod
    def _relative(cls, v: str) -> str:
        parts = v.strip("/").split("/")
        if not v or v.startswith("/") or ".." in parts or "://" in v:
            raise ValueError(f"{v!r}: a folder name relative to the dataset")
        return v.strip("/")

    @property
    def repack(self) -> bool:
        """Whether the reduce re-packs the partials' tars into the output shards."""
        return self.samples_per_shard is not None or self.shuffle

    def reinforced_config(self, dims: list[int], earlier: dict[str, Any] | None = None) -> ReinforcedConfig:
        """config.json's model; ``earlier``: the generators the job's text stages record."""
        gens = _with_prompt_hashes({**(earlier or {}), **self.generators})
        return ReinforcedConfig(
            teachers=[TeacherConfig(name=t.label(), pretrained=_shown(t.pretrained), dim=d)
                      for t, d in zip(self.teachers, dims)],
            aug=self.aug, emb_dtype=self.emb_dtype, emb_format=self.emb_format, generators=gens)

    @model_validator(mode="after")
    def _format_accepts(self) -> ReinforceConfig:
        if self.emb_dtype == "bfloat16" and self.emb_format != "pth.gz":
            raise ValueError("emb_dtype bfloat16 needs emb_format 'pth.gz' (npz has no bfloat16)")
        return self


def _shown(pretrained: str | None) -> str | None:
    """A checkpoint as config.json names it: the file name and its content hash, not the machine's path."""
    if pretrained is None or "://" in pretrained or not Path(pretrained).is_file():
        return pretrained
    h = hashlib.sha256()
    with open(pretrained, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{Path(pretrained).name} (sha256 {h.hexdigest()[:16]})"


def _with_prompt_hashes(gens: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in gens.items():
        if isinstance(v, dict):
            v = _with_prompt_hashes(v)
        out[k] = v
        if isinstance(v, str) and "prompt" in k:
            out[f"{k}_sha256"] = hashlib.sha256(v.encode()).hexdigest()
    return out


# stage whose config describes a text generator -> config.json's key for it
TEXT_STAGES = (("recaption", "captioner"), ("rewrite", "rewriter"))
_SAMPLING = ("temperature", "top_p", "max_tokens", "greedy", "max_len")


def text_generators(earlier_config) -> dict[str, Any]:
    """config.json's generators from the configs of the job's text stages that ran before this one
    (``earlier_config``: the stage context's accessor): model, mode, prompt and its hash, sampling.
    Endpoints and key variables are left out: they say where a model ran, not what wrote the texts."""
    out: dict[str, Any] = {}
    for stage, key in TEXT_STAGES:
        conf = earlier_config(stage)
        if conf is None:
            continue
        backend = conf.get("backend") or {}
        prompts = conf.get("prompts") or {}
        prompt = prompts.get("template", prompts.get("instruction"))
        gen: dict[str, Any] = {"stage": stage, "kind": backend.get("kind"), "model": backend.get("model"),
                               "mode": conf.get("mode"), "k": conf.get("k"),
                               "sampling": {k: backend[k] for k in _SAMPLING if backend.get(k) is not None}}
        if prompt:
            gen["prompt"] = prompt
        # the stage's own digest of everything that decides a reply (prompt, schema, sampling)
        gen["request_sha256"] = prompts.get("sha256")
        for extra in ("schema_sha256", "meta_pairs_sha256"):
            if prompts.get(extra):
                gen[extra] = prompts[extra]
        out[key] = {k: v for k, v in gen.items() if v is not None}
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return v if np.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return v


class ReinforceStage(GlobalStage):
    name = "reinforce"
    Config = ReinforceConfig
    stateful = True  # an actor pool: the teachers load once per worker, on its first shard
    default_batch_size = 1 << 20

    def reads(self) -> tuple[str, ...]:
        return (IMAGE_COLUMN, "caption")

    def optional_reads(self) -> tuple[str, ...]:
        cols = ["url", "sha256", *SCORE_COLUMNS, *META_COLUMNS, *NEG_COLUMNS, *LLM_NEG_COLUMNS]
        cols += [c for c, _ in SYN_COLUMNS] + [c for c in HQ_COLUMNS if c not in cols]
        return tuple(dict.fromkeys(cols))

    def carry(self) -> tuple[str, ...]:
        return _CARRY

    def teardown(self) -> None:
        for enc in getattr(self, "_teachers", None) or []:
            enc.close()
        self._teachers = None

    def _load(self) -> list:
        teachers = getattr(self, "_teachers", None)
        if teachers is None:
            from recap.models.encoders import load_encoder

            cfg: ReinforceConfig = self.config
            teachers = []
            for k, t in enumerate(cfg.teachers):
                try:
                    teachers.append(load_encoder(t.spec(), precision=cfg.precision))
                except EncoderError as e:
                    raise EncoderError(e.field, f"{self.ctx.stage}.teachers[{k}].{e.field}: {e}") from e
            self._teachers = teachers
        return teachers

    # -- the heavy pass -------------------------------------------------------------------------

    def _embed(self, crops: list, text_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(image rows [len(crops), D], text rows [sum(len), D]), each teacher's slice unit-norm."""
        img_parts, txt_parts = [], []
        flat = [t for ts in text_lists for t in ts]
        for enc in self._load():
            img_parts.append(enc.encode_preprocessed([enc.preprocess(c) for c in crops]))
            txt_parts.append(enc.encode_texts(flat)[0] if flat else np.zeros((0, enc.dim), np.float32))
        return np.concatenate(img_parts, axis=1), np.concatenate(txt_parts, axis=1)

    def partial(self, batch: pa.Table) -> Any:
        from recap.pipeline.pixels import bounded_aspect, decode, to_rgb

        cfg: ReinforceConfig = self.config
        teachers = self._load()
        dims = [t.dim for t in teachers]
        rconf = cfg.reinforced_config(dims, text_generators(self.ctx.earlier_config))
        present = set(batch.column_names)
        cols = {c: batch.column(c).to_pylist() for c in batch.column_names}
        rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
        drops: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        notes: list[str | None] = [None] * len(rows)
        samples: list[dict | None] = [None] * len(rows)
        coverage = {"samples": 0, **{f: 0 for f in ("syn_caption", "syn_rewrite", "long_positive", "long_negative",
                                                    "short_positive", "short_negative", "text_negatives",
                                                    "hard_negatives", "llm_negatives", "teacher_embeddings")}}
        example = None
        for start in range(0, len(rows), cfg.encode_batch):
            chunk = range(start, min(start + cfg.encode_batch, len(rows)))
            crops, text_lists, owners = [], [], []
            for i in chunk:
                s, why = self._sample(rows[i], present, cfg, rconf)
                if s is None:
                    drops[i], details[i] = "decode_error", why
                    continue
                img, _ = decode(rows[i][IMAGE_COLUMN])
                rgb = to_rgb(bounded_aspect(img))
                crops.extend(replay_augmentation(rgb, p, cfg.aug) for p in s["param_aug"])
                negs = (s.get("neg") or {}).get("neg_text_short", [])
                text_lists.append([s["txt"], *s["syn"]["syn_text"]] if s.get("syn") else [s["txt"]])
                text_lists.append(list(negs))
                owners.append(i)
                samples[i] = s
                notes[i] = ",".join(s.pop("_missing")) or None
            if not owners:
                continue
            img_emb, txt_emb = self._embed(crops, text_lists)
            at_i = at_t = 0
            for k, i in enumerate(owners):
                s = samples[i]
                n_aug, n_txt, n_neg = len(s["param_aug"]), len(text_lists[2 * k]), len(text_lists[2 * k + 1])
                s["image_emb"] = img_emb[at_i:at_i + n_aug]
                s["text_emb"] = txt_emb[at_t:at_t + n_txt]
                s["neg_text_emb"] = txt_emb[at_t + n_txt:at_t + n_txt + n_neg] if s.get("neg") is not None else None
                at_i += n_aug
                at_t += n_txt + n_neg
                arrays = [a for a in (s["image_emb"], s["text_emb"], s["neg_text_emb"]) if a is not None]
                if not all(np.isfinite(a).all() for a in arrays):
                    drops[i], details[i], notes[i], samples[i] = "nonfinite_embedding", "a teacher gave NaN or inf", \
                        None, None
        kept = [s for s in samples if s is not None]
        for s in kept:
            self._count(s, coverage)
        if kept:
            example = _example(kept[0])
        # a re-packed dataset's partial tars wait in parts/ for the reduce; shards/ holds only output
        rel = f"{cfg.output}/{PARTS_DIR if cfg.repack else SHARDS_DIR}/{{shard}}.tar"
        files = {}
        summary: dict[str, Any] = {"n": len(kept), "dims": dims, "coverage": coverage, "example": example}
        if kept:
            data, n = encode_shard(kept, rconf)
            files[rel] = data
            summary.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        carried = pa.table({"uid": batch.column("uid"), "reinforce_drop": pa.array(drops, pa.string()),
                            "reinforce_detail": pa.array(details, pa.string()),
                            "reinforce_note": pa.array(notes, pa.string())})
        return summary, carried, files

    def _sample(self, row: dict, present: set[str], cfg: ReinforceConfig, rconf: ReinforcedConfig
                ) -> tuple[dict | None, str | None]:
        from recap.pipeline.pixels import decode

        data = row.get(IMAGE_COLUMN)
        img, why = decode(data)
        if img is None:
            return None, why or "no image bytes"
        uid = row["uid"]
        width, height = img.size
        missing = [f"missing_{c}" for c in (*(c for c, _ in SYN_COLUMNS), *HQ_COLUMNS, *LLM_NEG_COLUMNS, *NEG_COLUMNS)
                   if c in present and row.get(c) is None]
        meta: dict[str, Any] = {"uid": uid, "sha256": row.get("sha256") or hashlib.sha256(data).hexdigest(),
                                "width": width, "height": height,
                                "scores": {c: _json_value(row[c]) for c in SCORE_COLUMNS if row.get(c) is not None}}
        for c in META_COLUMNS:
            if c in present:
                meta[c] = _json_value(row.get(c))
        s: dict[str, Any] = {"uid": uid, "jpg": data, "txt": row.get("caption") or "", "json": meta,
                             "param_aug": sample_param_aug(width, height, cfg.aug, self.ctx.seed, uid,
                                                           stage=self.ctx.stage),
                             "_missing": sorted(dict.fromkeys(missing))}
        if row.get("url"):
            s["url"] = row["url"]
        syn_text, syn_source = syn_texts(row)
        hq = {}
        for c in HQ_COLUMNS:
            vals = texts(row.get(c))
            if vals:
                hq[c] = vals[0] if c.startswith("long_") else vals
        if syn_text or hq or any(c in present for c, _ in SYN_COLUMNS):
            s["syn"] = {"syn_text": syn_text, "syn_source": syn_source, **hq}
        n_pos = 1 + len(syn_text)
        if any(c in present for c in NEG_COLUMNS):
            short = [t if isinstance(t, str) else "" for t in (row.get("neg_text_short") or [])]
            of = list(row.get("neg_of") or [0] * len(short))
            typ = list(row.get("neg_type") or ["rule"] * len(short))
            keep = [k for k, t in enumerate(short) if t and k < len(of) and k < len(typ) and 0 <= int(of[k]) < n_pos]
            s["neg"] = {"neg_text_short": [short[k] for k in keep], "neg_of": [int(of[k]) for k in keep],
                        "neg_type": [typ[k] for k in keep],
                        "hard_neg_uids": list(row.get("hard_neg_uids") or []),
                        "hard_neg_sims": [_json_value(float(x)) for x in (row.get("hard_neg_sims") or [])]}
        elif any(c in present for c in LLM_NEG_COLUMNS):
            llm = texts(row.get("neg_text_llm"))
            types = row.get("neg_type_llm") if isinstance(row.get("neg_type_llm"), list) else []
            s["neg"] = {"neg_text_short": llm, "neg_of": [0] * len(llm),
                        "neg_type": [types[k] if k < len(types) and isinstance(types[k], str) else "llm"
                                     for k in range(len(llm))], "hard_neg_uids": [], "hard_neg_sims": []}
        return s, None

    @staticmethod
    def _count(s: dict, coverage: dict) -> None:
        coverage["samples"] += 1
        syn, neg = s.get("syn") or {}, s.get("neg") or {}
        src = syn.get("syn_source", [])
        coverage["syn_caption"] += "caption" in src
        coverage["syn_rewrite"] += "rewrite" in src
        for c in HQ_COLUMNS:
            coverage[c] += bool(syn.get(c))
        coverage["text_negatives"] += bool(neg.get("neg_text_short"))
        coverage["hard_negatives"] += bool(neg.get("hard_neg_uids"))
        coverage["llm_negatives"] += any(str(t).startswith("llm") for t in neg.get("neg_type", []))
        coverage["teacher_embeddings"] += s.get("image_emb") is not None

    # -- reduce: the dataset's index files ------------------------------------------------------

    def reduce(self, partials: list[Any]) -> dict:
        cfg: ReinforceConfig = self.config
        dims, entries, coverage, example = None, [], {}, None
        for shard, p in enumerate(partials):
            if p["n"] and dims is not None and p["dims"] != dims:
                bad = next(k for k, (a, b) in enumerate(zip(dims, p["dims"])) if a != b)
                raise UserError(f"{self.ctx.stage}: teacher {bad} ({cfg.teachers[bad].model}) gave {p['dims'][bad]}-d "
                                f"embeddings on shard {shard} but {dims[bad]}-d before: the teachers changed during "
                                f"the run; run the stage again")
            dims = p["dims"] if p["n"] else dims
            for k, v in p["coverage"].items():
                coverage[k] = coverage.get(k, 0) + v
            if p["n"]:
                name = shard_file(shard)
                entries.append({"name": name, "path": f"{SHARDS_DIR}/{name}", "n": p["n"], "bytes": p["bytes"],
                                "sha256": p["sha256"]})
                example = example or p["example"]
        self._packed: dict[str, bytes] = {}
        if cfg.repack and entries:
            self._packed, entries = self._repack([int(e["name"].split(".")[0]) for e in entries])
        dims = dims or [0] * len(cfg.teachers)
        gens = text_generators(self.ctx.earlier_config)
        return {"config": cfg.reinforced_config(dims, gens).model_dump(mode="json") if all(dims) else None,
                "entries": entries, "coverage": coverage, "example": example, "output": cfg.output}

    def _repack(self, shards: list[int]) -> tuple[dict[str, bytes], list[dict]]:
        """Output tars of ``samples_per_shard`` samples from the partials' tars (read back once),
        in pipeline order or, with ``shuffle``, sorted by a hash of (job seed, uid): either way
        the order never depends on how the work was split among workers."""
        cfg: ReinforceConfig = self.config
        groups: list[tuple[str, dict[str, bytes]]] = []
        for shard in shards:
            groups.extend(read_tar(self.data.published(f"{cfg.output}/{PARTS_DIR}/{shard_file(shard)}")).items())
        if cfg.shuffle:
            keys = uniform(self.ctx.seed, f"{self.ctx.stage}.shuffle", [k for k, _ in groups])
            order = sorted(range(len(groups)), key=lambda i: (keys[i], groups[i][0]))
            groups = [groups[i] for i in order]
        size = cfg.samples_per_shard or len(groups)
        files, entries = {}, []
        for index, start in enumerate(range(0, len(groups), size)):
            chunk = groups[start:start + size]
            data = write_tar(chunk)
            name = shard_file(index)
            files[f"{SHARDS_DIR}/{name}"] = data
            entries.append({"name": name, "path": f"{SHARDS_DIR}/{name}", "n": len(chunk), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
            groups[start:start + size] = [None] * len(chunk)  # free each sample once it is packed
        return files, entries

    def publish(self, state: dict) -> dict[str, bytes]:
        if state["config"] is None:
            return {}
        config = ReinforcedConfig.model_validate(state["config"])
        files = dict(getattr(self, "_packed", None) or {})
        files.update(index_files(config, state["entries"]))
        return {f"{state['output']}/{rel}": data for rel, data in files.items()}

    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        return verdicts(batch.column("uid"), drop=batch.column("reinforce_drop").combine_chunks(),
                        detail=batch.column("reinforce_detail").combine_chunks(),
                        note=batch.column("reinforce_note").combine_chunks())

    # -- recap inspect --------------------------------------------------------------------------

    @classmethod
    def summarize(cls, data: StageData) -> dict | None:
        if not data.has_state():
            return None
        st = data.state()
        config = st.get("config") or {}
        return {"output": st.get("output"), "shards": len(st.get("entries", [])),
                "samples": sum(e["n"] for e in st.get("entries", [])),
                "teachers": [f"{t['name']} ({t['dim']})" for t in config.get("teachers", [])],
                "n_aug": config.get("aug", {}).get("n_aug"), "coverage": st.get("coverage", {}),
                "example": st.get("example")}

    @classmethod
    def summary_lines(cls, s: dict) -> list[str]:
        cov = s.get("coverage", {})
        n = cov.get("samples", 0) or 1
        lines = [f"  {cls.name}: {s['samples']} samples in {s['shards']} shards under {s['output']}/, teachers "
                 f"{', '.join(s['teachers']) or 'none'}, {s['n_aug']} augmentations each",
                 "    coverage: " + ", ".join(f"{k} {v} ({100 * v / n:.0f}%)" for k, v in cov.items() if k != "samples")]
        ex = s.get("example")
        if ex:
            lines.append(f"    example {ex['uid']}: txt {_clip(ex['txt'])}")
            for t, src in zip(ex.get("syn_text", []), ex.get("syn_source", [])):
                lines.append(f"      syn ({src}): {_clip(t)}")
            negs = list(zip(ex.get("neg_text_short", []), ex.get("neg_type", [])))
            for t, typ in negs[:8]:
                lines.append(f"      neg ({typ}): {_clip(t)}")
            if len(negs) > 8:
                lines.append(f"      ... {len(negs) - 8} more negatives")
            if ex.get("hard_neg_uids"):
                lines.append(f"      hard_neg_uids: {', '.join(ex['hard_neg_uids'][:4])}"
                             + (" ..." if len(ex["hard_neg_uids"]) > 4 else ""))
            lines.append("      embeddings: " + ", ".join(f"{k} {v}" for k, v in ex.get("shapes", {}).items()))
        return lines


def _clip(text: str, limit: int = 200) -> str:
    """A text as the report shows it: quoted, and cut with its length said when it is long (a web
    caption can be megabytes)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def _example(s: dict) -> dict:
    syn, neg = s.get("syn") or {}, s.get("neg") or {}
    return {"uid": s["uid"], "txt": s["txt"], "syn_text": syn.get("syn_text", []),
            "syn_source": syn.get("syn_source", []), "neg_text_short": neg.get("neg_text_short", []),
            "neg_type": neg.get("neg_type", []), "hard_neg_uids": neg.get("hard_neg_uids", []),
            "shapes": {f: list(s[f].shape) for f in ("image_emb", "text_emb", "neg_text_emb") if s.get(f) is not None}}

