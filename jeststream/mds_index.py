"""The shards of a local MosaicML (MDS) dataset directory, as its ``index.json`` lists them.

Imports neither ``streaming`` nor torch: ``jeststream report`` and ``precompute-reference`` list
the shards here and open each with ``streaming``'s own reader (``reader_from_json(dirname,
None, shard.info)``). Only shards present, uncompressed, in the directory are accepted; a
missing index or shard is a ValueError naming the directory (``--mds``, as both tools call it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MDSShard", "mds_shards"]


@dataclass(frozen=True)
class MDSShard:
    """One shard of an MDS directory."""

    name: str  # the shard's file name without ``.mds``
    path: str  # the shard file
    samples: int
    offset: int  # the global index of its first sample (samples are numbered across shards)
    info: dict[str, Any]  # its entry of index.json


def mds_shards(local: str | os.PathLike) -> list[MDSShard]:
    """The shards of the MDS dataset directory ``local``, in index order."""
    local = os.fspath(local)
    index = Path(local) / "index.json"
    if not index.is_file():
        raise ValueError(f"--mds {local}: no index.json (not an MDS dataset directory)")
    out, offset = [], 0
    for info in json.loads(index.read_text())["shards"]:
        basename = info["raw_data"]["basename"]
        if not (Path(local) / basename).is_file():
            raise ValueError(
                f"--mds {local}: shard {basename} is not there (compressed or remote shards: "
                "download and decompress them into the directory first)"
            )
        name = basename[: -len(".mds")] if basename.endswith(".mds") else basename
        out.append(MDSShard(name, str(Path(local) / basename), int(info["samples"]), offset, info))
        offset += int(info["samples"])
    return out
