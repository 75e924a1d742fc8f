"""Stage 2, capture: each source's top-k next-token log-probabilities, stored compactly.

- ``compute``: pure tensor functions (top-k of the log-softmax over the real vocabulary,
  gold log-probability, tail mass), chunked so no second full-vocabulary tensor exists.
- ``storage``: the on-disk format (one Parquet row per block, quantised and byte-plane
  coded, zstd) and the readers the align stage uses (``iter_capture``, ``load_capture``).
- ``stage``: ``run_capture`` (the ``fuselm capture`` command), resumable and split across
  torchrun / accelerate ranks by shard.
"""

from fuselm.capture.storage import (
    CaptureBlock,
    capture_manifest,
    capture_shards,
    iter_capture,
    load_capture,
    read_shard,
)

__all__ = [
    "CaptureBlock",
    "capture_manifest",
    "capture_shards",
    "iter_capture",
    "load_capture",
    "read_shard",
]
