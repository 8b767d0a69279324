"""webdataset tar shards as a JEST-ready base loader, and checked stages for your own
webdataset pipelines.

    loader = webdataset_loader("shards/{0000..0099}.tar", batch_size=256,
                               tokenizer=open_clip.get_tokenizer("ViT-B-32"),
                               transform=preprocess, num_workers=8)
    jest = JESTLoader(loader, learner, reference, ratio=0.2, selection_log="sel.parquet")
    for images, texts, keys in jest: ...

Every batch is ``(images [b,3,H,W], texts [b,ctx] or list[str], keys list[str])`` of exactly
``batch_size`` examples, ``keys`` the samples' ``__key__`` (JESTLoader finds them at position 2,
for the selection log). A damaged shard is reported, never a silently shorter epoch; the output
is the same under webdataset 0.2.x and 1.0.x; resume is exact for the same shards,
``num_workers`` and world size. Your own pipeline as the base loader, and its limits:
docs/install.md.

The public names of three modules: :mod:`~jeststream.adapters.wds_tar` (reading shards into
samples, damage reports), :mod:`~jeststream.adapters.wds_decode` (samples to images, captions
and batches), :mod:`~jeststream.adapters.wds_dataset` (the sharded, resumable dataset).
"""

from __future__ import annotations

from jeststream.adapters.wds_dataset import WebDatasetLoader, webdataset_loader
from jeststream.adapters.wds_decode import (
    IMAGE_EXTS,
    NETPBM_EXTS,
    TEXT_EXTS,
    decode_image,
    default_image_transform,
    first_field,
    normalize_batch,
)
from jeststream.adapters.wds_tar import (
    BadShardError,
    BadShardWarning,
    ShardErrorCounter,
    TruncatedShardError,
    checked_tarfile_samples,
    checked_tarfile_to_samples,
    checked_webdataset,
    expand_urls,
    shard_samples,
    tar_members,
)

__all__ = [
    "IMAGE_EXTS",
    "NETPBM_EXTS",
    "TEXT_EXTS",
    "BadShardError",
    "BadShardWarning",
    "ShardErrorCounter",
    "TruncatedShardError",
    "WebDatasetLoader",
    "checked_tarfile_samples",
    "checked_tarfile_to_samples",
    "checked_webdataset",
    "decode_image",
    "default_image_transform",
    "expand_urls",
    "first_field",
    "normalize_batch",
    "shard_samples",
    "tar_members",
    "webdataset_loader",
]
