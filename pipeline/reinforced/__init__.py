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
    paug.json    {"param_aug": [N_aug x [[i, j, h, w], [[op_idx, mag_bin] x num_ops]]]}
                 (i, j, h, w): RandomResizedCrop box (top, left, height, width) in pixels of the
                 stored image; op_idx indexes ``config.aug.ops``; mag_bin is a *signed* magnitude
                 bin: |mag_bin| indexes the op's magnitudes as torchvision's
                 ``RandAugment._augmentation_space(num_magnitude_bins, (S, S))`` computes them for
                 the output size S, and a negative bin negates a signed op's magnitude.
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
                 DataCompDR's ``pth.gz`` (bf16 torch pickles) is not written or read yet.

Modules: ``config`` (the config.json models), ``augment`` (param_aug sampling and replay),
``codec`` (one sample <-> its tar members), ``layout`` (file names in the dataset directory),
``writer``, ``reader``; ``testing`` builds small datasets for tests and is not imported here.
"""
from recap.pipeline.reinforced.augment import apply_param_aug, check_param, sample_param_aug
from recap.pipeline.reinforced.codec import (EMB_FIELDS, IMAGE_EXTS, decode_sample, encode_sample, encode_shard,
                                             load_npz, npz_bytes)
from recap.pipeline.reinforced.config import (FORMAT, PLAIN_AUG, RANDAUGMENT_OPS, VERSION, AugConfig,
                                              ReinforcedConfig, ReinforcedFormatError, TeacherConfig)
from recap.pipeline.reinforced.layout import shard_file
from recap.pipeline.reinforced.reader import find_config, iter_raw, iter_shard, list_shards, read_config, read_sizes
from recap.pipeline.reinforced.writer import ReinforcedWriter, write_index

__all__ = [
    "EMB_FIELDS", "FORMAT", "IMAGE_EXTS", "PLAIN_AUG", "RANDAUGMENT_OPS", "VERSION",
    "AugConfig", "ReinforcedConfig", "ReinforcedFormatError", "ReinforcedWriter", "TeacherConfig",
    "apply_param_aug", "check_param", "decode_sample", "encode_sample", "encode_shard", "find_config", "iter_raw",
    "iter_shard", "list_shards", "load_npz", "npz_bytes", "read_config", "read_sizes", "sample_param_aug",
    "shard_file", "write_index",
]
