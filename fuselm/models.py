"""Loading tokenizers and model configs, and the digests that fingerprint them.

Shared by every stage that touches a model; kept free of stage logic. Loading goes
through the real ``from_pretrained`` paths (hub names or local folders, optional GGUF), so
what runs in tests on tiny local models is what runs on a cluster on 7B ones.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from fuselm.artifacts import StageError, file_digest, fingerprint, tokenizer_digest
from fuselm.config import ModelConfig

# Config attributes that hold a model's context length, across architectures.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


class ModelLoadError(StageError):
    """A model or tokenizer cannot be loaded; the message names the model and what to do."""


def _common_kwargs(m: ModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if m.revision:
        kw["revision"] = m.revision
    if m.gguf_file:
        kw["gguf_file"] = m.gguf_file
    return kw


def _explain(m: ModelConfig, what: str, path: str, err: Exception) -> ModelLoadError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    hint = ""
    if "trust_remote_code" in str(err):
        hint = (
            " The model needs its own code: set trust_remote_code: true for "
            f"'{m.resolved_name()}' if you trust it."
        )
    elif not Path(path).exists():
        hint = (
            " It is not a local path; loading it by name needs the Hugging Face hub "
            "(offline here?). Download it once and point the config at the local folder."
        )
    return ModelLoadError(
        f"model '{m.resolved_name()}': cannot load {what} from {path!r}: {msg}.{hint}"
    )


@functools.lru_cache(maxsize=32)
def _load_tokenizer_cached(path: str, kw_json: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **json.loads(kw_json))


def load_tokenizer(m: ModelConfig) -> Any:
    """Load the tokenizer of a model (its own ``tokenizer`` path if set)."""
    if not m.tokenizer_path:
        raise ModelLoadError(f"model '{m.resolved_name()}': no `model` path or name configured")
    kw = _common_kwargs(m)
    if m.tokenizer and m.tokenizer != m.model:
        kw.pop("gguf_file", None)  # a separate tokenizer is not inside the model's GGUF
    try:
        return _load_tokenizer_cached(m.tokenizer_path, json.dumps(kw, sort_keys=True))
    except Exception as e:  # transformers raises many types for a bad path
        raise _explain(m, "tokenizer", m.tokenizer_path, e) from e


def load_model_config(m: ModelConfig) -> Any:
    """Load the model's ``PretrainedConfig`` (no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(m.model, **_common_kwargs(m))
    except Exception as e:
        raise _explain(m, "model config", m.model, e) from e


def model_context(m: ModelConfig) -> int | None:
    """The model's context length in tokens (``max_context`` overrides), or None if unknown."""
    if m.max_context:
        return m.max_context
    cfg = load_model_config(m)
    for attr in _CONTEXT_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def special_tokens_added(tokenizer: Any, bos_policy: str = "auto") -> int:
    """How many special tokens encoding a text adds (BOS/EOS/CLS...), under a BOS policy.

    Why: a block must fit the context *including* these, so the prepare stage reserves
    room for them per tokenizer.
    """
    n = len(tokenizer("", add_special_tokens=True)["input_ids"])
    has_bos = tokenizer.bos_token_id is not None and n > 0
    if bos_policy == "add" and not has_bos:
        n += 1
    return n


@functools.lru_cache(maxsize=64)
def _dir_weights_digest(path: str, stamp: str) -> str:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return fingerprint([(str(p.relative_to(path)), file_digest(p)) for p in files])


def model_identity(m: ModelConfig, with_weights: bool = True) -> dict[str, Any]:
    """What a model contributes to a stage fingerprint.

    Local folders are identified by the content of their config and (optionally) weight
    files, so editing a model in place makes dependent stages stale; hub names by name and
    revision (the hub's own content addressing covers the rest).
    """
    ident: dict[str, Any] = {"model": m.model, "revision": m.revision, "gguf_file": m.gguf_file}
    p = Path(m.model)
    if p.is_dir():
        cfg = p / "config.json"
        ident["config"] = file_digest(cfg) if cfg.exists() else None
        if with_weights:
            stamp = fingerprint(
                sorted(
                    (str(f), f.stat().st_size, f.stat().st_mtime_ns)
                    for f in p.rglob("*")
                    if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
                )
            )
            ident["weights"] = _dir_weights_digest(str(p), stamp)
    return ident


def tokenizer_identity(m: ModelConfig) -> str:
    """Content digest of the model's tokenizer."""
    return tokenizer_digest(load_tokenizer(m))
