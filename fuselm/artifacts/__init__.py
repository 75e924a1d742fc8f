"""The run-directory contract: manifests, fingerprints, atomic shards, stage status.

Stages never talk to each other in memory; they talk through ``<run_dir>/<stage>/``. Why:
a capture of a 7B source can take days, so every stage must be resumable, skippable when
nothing changed, and refuse to reuse output that no longer matches its inputs.

Layout of one stage directory::

    <run_dir>/<stage>/
        _pending.json       written first: fingerprint + planned shards (a run in progress)
        <shard>.parquet     written to a temporary name, then renamed (never half-written)
        config.json         the resolved stage configuration
        manifest.json       written LAST: its presence means the stage finished

A stage name may have one level of nesting (``capture/<source>``). The manifest holds the
fingerprint of everything the output depends on (input manifests, model and tokenizer
digests, the stage config, the library version) and the *components* of that fingerprint,
so that a mismatch can be reported field by field.

Two modules: :mod:`~fuselm.artifacts.files` (atomic writes, temporaries, safe reads, the
run-dir lock) and :mod:`~fuselm.artifacts.stage` (fingerprints, manifests, the stage
life cycle). Their public names are re-exported here, so callers import from
``fuselm.artifacts``.
"""

from fuselm.artifacts.files import (
    LOCK,
    RUN_MARKER,
    TMP_MARK,
    StageError,
    atomic_write_bytes,
    atomic_write_json,
    ensure_run_dir,
    read_json,
    read_shard_metadata,
    remove_stale_temporaries,
    run_lock,
    write_parquet_atomic,
)
from fuselm.artifacts.stage import (
    MANIFEST,
    PENDING,
    Stage,
    StageStatus,
    canonical_json,
    diff_components,
    file_digest,
    fingerprint,
    text_digest,
    tokenizer_digest,
)

__all__ = [
    "RUN_MARKER",
    "LOCK",
    "TMP_MARK",
    "StageError",
    "remove_stale_temporaries",
    "atomic_write_bytes",
    "atomic_write_json",
    "write_parquet_atomic",
    "read_shard_metadata",
    "read_json",
    "ensure_run_dir",
    "run_lock",
    "MANIFEST",
    "PENDING",
    "canonical_json",
    "fingerprint",
    "file_digest",
    "text_digest",
    "tokenizer_digest",
    "diff_components",
    "StageStatus",
    "Stage",
]
