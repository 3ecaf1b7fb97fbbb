"""The reinforced shard format: config, writer, tolerant reader and augmentation replay.

One definition shared by the reinforce stage (which writes it) and the trainer (which reads it).
DataCompDR-compatible (MobileCLIP), extended with provenance of synthetic captions and negatives.

Dataset directory (local path or any fsspec URL)::

    config.json          ReinforcedConfig: teachers (concatenation order, dims), aug config, generators
    sizes.json           {"00000.tar": n, ...}  (also copied to shards/sizes.json, where open_clip looks)
    manifest.jsonl       one line per shard: {"name", "path", "n", "bytes", "sha256"}
    shards/NNNNN.tar     deterministic tars (pipeline.shards.write_tar: members in input order,
                         mtime 0, uid/gid 0)

Members of one sample (webdataset key = uid; only ``jpg``, ``txt``, ``json`` are required):

    jpg          image bytes (the reader also accepts png/jpeg/webp from plain img2dataset shards)
    txt          primary (GT) caption, UTF-8
    url.txt      source URL
    json         {uid, sha256, width, height, scores: {...}, matched_entries, balance_prob, ...}
    paug.json    {"param_aug": [N_aug entries]}, each in DataCompDR's compressed layout (what
                 ml-mobileclip's ``Compose.compress`` emits for config.json's
                 ``reinforce.image_augmentation``): ``[[i, j, h, w], [[op_index, magnitude] x num_ops]]``,
                 with a flip bool between the two when ``aug.hflip`` > 0. (i, j, h, w): the
                 RandomResizedCrop box (top, left, height, width) in pixels of the stored image;
                 op_index indexes ``RANDAUGMENT_OPS`` (DataCompDR's op_names); magnitude: the signed value
                 torchvision's RandAugment applies, computed for the output size ``aug.image_size``
                 (e.g. ShearX 0.09, Rotate 9.0, Posterize 7.0 at bin 9 of 31). Format version 1 stored
                 ``[op_idx into aug.ops, signed magnitude bin]``; the reader converts such entries.
    syn.json     {"syn_text": [...], "syn_source": [...] (parallel: caption, rewrite, short, ...),
                  HQ-CLIP's "long_positive", "short_positive", "short_negative", ...}
    neg.json     {"neg_text_short": [...], and parallel to it: "neg_text_long", "neg_of" (index into
                  [GT] + syn_text of the text each negative was made from), "neg_type";
                  "hard_neg_uids" and parallel "hard_neg_sims" (kNN image hard negatives)}
    npz          image_emb [N_aug, D] (row i <-> param_aug[i]); text_emb [1 + n_syn, D] (row 0 = GT,
                 then syn_text in order); neg_text_emb [len(neg_text_short), D]. D = sum of teacher
                 dims, concatenated in config order, each teacher's slice L2-normalised; stored as
                 ``config.emb_dtype`` (float16 by default). The zip is written by hand with fixed
                 timestamps (np.savez stamps the current time), so equal arrays give equal bytes.
    pth.gz       the same arrays as DataCompDR ships bf16 embeddings: a gzipped torch pickle of tensors
                 (``emb_format: pth.gz``, ``emb_dtype: bfloat16``); read when a sample has no npz.

config.json also carries ``reinforce.image_augmentation``, the augmentation in ml-mobileclip's
vocabulary (derived from ``aug``), so DataCompDR tooling replays our param_aug with
``compose_from_config`` + ``decompress`` + ``reapply``; ``replay_augmentation`` gives the same pixels.

Modules: ``config`` (the config.json models), ``augment`` (param_aug sampling, replay, version-1 conversion),
``codec`` (one sample <-> its tar members), ``layout`` (file names in the dataset directory),
``writer``, ``reader``; ``testing`` builds small datasets for tests and is not imported here.
"""
from recap.pipeline.reinforced.augment import check_param, replay_augmentation, sample_param_aug, upgrade_v1
from recap.pipeline.reinforced.codec import (EMB_FIELDS, EMB_MEMBERS, IMAGE_EXTS, decode_sample, encode_sample,
                                             encode_shard, load_npz, load_pth_gz, npz_bytes, pth_gz_bytes)
from recap.pipeline.reinforced.config import (FORMAT, OPENAI_MEAN, OPENAI_STD, PLAIN_AUG, RANDAUGMENT_OPS, VERSION,
                                              AugConfig, ReinforcedConfig, ReinforcedFormatError, TeacherConfig)
from recap.pipeline.reinforced.layout import shard_file
from recap.pipeline.reinforced.reader import find_config, iter_raw, iter_shard, list_shards, read_config, read_sizes
from recap.pipeline.reinforced.writer import ReinforcedWriter, index_files, write_index

__all__ = [
    "EMB_FIELDS", "EMB_MEMBERS", "FORMAT", "IMAGE_EXTS", "OPENAI_MEAN", "OPENAI_STD", "PLAIN_AUG", "RANDAUGMENT_OPS",
    "VERSION", "AugConfig", "ReinforcedConfig", "ReinforcedFormatError", "ReinforcedWriter", "TeacherConfig",
    "check_param", "decode_sample", "encode_sample", "encode_shard", "find_config", "iter_raw", "iter_shard",
    "list_shards", "load_npz", "load_pth_gz", "npz_bytes", "pth_gz_bytes", "read_config", "read_sizes",
    "index_files", "replay_augmentation", "sample_param_aug", "shard_file", "upgrade_v1", "write_index",
]
