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
    elif what == "tokenizer" and Path(path).is_dir() and not _has_tokenizer_files(Path(path)):
        hint = (
            " The folder holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "vocab.json, tokenizer.model): save the tokenizer into it "
            f"(tokenizer.save_pretrained), or set `tokenizer:` for '{m.resolved_name()}' to "
            "the folder that has it."
        )
    elif not Path(path).exists():
        hint = (
            " It is not a local path; loading it by name needs the Hugging Face hub "
            "(offline here?). Download it once and point the config at the local folder."
        )
    return ModelLoadError(
        f"model '{m.resolved_name()}': cannot load {what} from {path!r}: {msg}.{hint}"
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).exists() for f in _TOKENIZER_FILES)


def _files_stamp(folder: Path) -> str:
    """Names, sizes and modification times of the files directly in a local folder."""
    if not folder.is_dir():
        return ""
    return fingerprint(
        sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in folder.iterdir()
            if f.is_file()
        )
    )


@functools.lru_cache(maxsize=32)
def _load_tokenizer_cached(path: str, kw_json: str) -> Any:
    from transformers import AutoTokenizer

    kw = json.loads(kw_json)
    kw.pop("_stamp", None)
    return AutoTokenizer.from_pretrained(path, **kw)


def load_tokenizer(m: ModelConfig) -> Any:
    """Load the tokenizer of a model (its own ``tokenizer`` path if set)."""
    if not m.tokenizer_path:
        raise ModelLoadError(f"model '{m.resolved_name()}': no `model` path or name configured")
    kw = _common_kwargs(m)
    if m.tokenizer and m.tokenizer != m.model:
        kw.pop("gguf_file", None)  # a separate tokenizer is not inside the model's GGUF
    # Part of the cache key, never passed on: a tokenizer file edited while the process
    # lives (a notebook, a long `fuselm status` session) must not be served from the cache.
    kw["_stamp"] = _files_stamp(Path(m.tokenizer_path))
    try:
        return _load_tokenizer_cached(m.tokenizer_path, json.dumps(kw, sort_keys=True))
    except Exception as e:  # transformers raises many types for a bad path
        raise _explain(m, "tokenizer", m.tokenizer_path, e) from e


def adapter_base(m: ModelConfig) -> ModelConfig | None:
    """For a folder holding a LoRA adapter only (``train.lora.save: adapter``), its base.

    The adapter's ``adapter_config.json`` names the base model it was trained on (a local
    folder or a hub name); the returned config loads that base with this model's other
    settings. None for an ordinary model folder.
    """
    from dataclasses import replace

    p = Path(m.model).expanduser()
    cfg = p / "adapter_config.json"
    if not (p.is_dir() and cfg.is_file()) or (p / "config.json").is_file():
        return None
    try:
        base = json.loads(cfg.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"model '{m.resolved_name()}': {cfg} does not name its base model ({e})"
        ) from None
    return replace(m, model=str(base), tokenizer=m.tokenizer or str(p), gguf_file="")


def load_model_config(m: ModelConfig) -> Any:
    """Load the model's ``PretrainedConfig`` (no weights; an adapter's: its base's)."""
    from transformers import AutoConfig

    base = adapter_base(m)
    if base is not None:
        return load_model_config(base)
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


# --------------------------------------------------------------------------- loading weights
# Added with the capture stage (issue #3); shared by every stage that runs a model.

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NOT_WEIGHTS = ("training_args.bin",)


def check_model_path(m: ModelConfig) -> None:
    """Fail early, naming the model, when ``model`` is a filesystem path that does not exist.

    Hub names (``org/name``) are left to ``from_pretrained``; anything absolute, starting
    with ``.``/``~`` or with more than one ``/`` is treated as a local path.
    """
    if not m.model:
        raise ModelLoadError(f"model '{m.resolved_name()}': no `model` path or name configured")
    p = str(m.model)
    looks_local = p.startswith(("/", ".", "~")) or p.count("/") > 1 or "\\" in p
    if looks_local and not Path(p).expanduser().exists():
        raise ModelLoadError(
            f"model '{m.resolved_name()}': model path {p} does not exist; point `model:` at "
            "a folder with config.json and weights (or at a Hugging Face model name)"
        )


def check_causal_lm(m: ModelConfig, config: Any) -> None:
    """Refuse a model whose config cannot be loaded as ``AutoModelForCausalLM``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (remote and m.trust_remote_code):
        return
    arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
    raise ModelLoadError(
        f"model '{m.resolved_name()}': {m.model} is not a causal language model (model_type "
        f"{model_type!r}, architectures: {arch}); fuselm needs a decoder that "
        "AutoModelForCausalLM can load (GPT-2, Llama, Mistral, Qwen, ...)"
    )


def check_weights_format(m: ModelConfig) -> bool | None:
    """Check the weight files of a local model folder against ``allow_pickle``.

    Returns:
        The ``use_safetensors`` argument for ``from_pretrained``: True (safetensors only),
        False (pickle allowed and the only format present) or None (GGUF, or pickle
        allowed for a hub name).

    Raises:
        ModelLoadError: only pickle weights and ``allow_pickle`` is off, no weights at all,
            or the configured ``gguf_file`` is missing.
    """
    p = Path(m.model).expanduser()
    if m.gguf_file:
        if p.is_dir() and not (p / m.gguf_file).is_file():
            raise ModelLoadError(
                f"model '{m.resolved_name()}': gguf_file {m.gguf_file} is not in {p}"
            )
        return None
    if not p.is_dir():  # a hub name: let the hub tell which files exist
        return None if m.allow_pickle else True
    files = [f for f in p.iterdir() if f.is_file()]
    has_safe = any(f.suffix == ".safetensors" for f in files)
    pickles = sorted(
        f.name for f in files if f.suffix in _PICKLE_SUFFIXES and f.name not in _NOT_WEIGHTS
    )
    if has_safe:
        return True
    if pickles and not m.allow_pickle:
        raise ModelLoadError(
            f"model '{m.resolved_name()}': {p} holds its weights only in pickle format "
            f"({', '.join(pickles[:3])}); loading pickle can run arbitrary code. Convert the "
            "weights to safetensors (load the model once and save_pretrained() it, which "
            "writes model.safetensors), or set allow_pickle: true for this model if you "
            "trust the files"
        )
    if pickles:
        return False
    raise ModelLoadError(
        f"model '{m.resolved_name()}': no weights in {p} (expected model.safetensors or a "
        "sharded *.safetensors set); is this the right folder?"
    )


def resolve_device(spec: str, local_rank: int | None = None) -> Any:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is present, else ``cpu``.

    Under torchrun/accelerate every process is given its own GPU by ``local_rank``; an
    explicit ``cuda:N`` is kept as written.
    """
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device: cuda was requested but no CUDA device is visible")
        spec = f"cuda:{local_rank or 0}"
    return torch.device(spec)


def resolve_dtype(spec: str, device: Any) -> Any:
    """``auto`` -> bfloat16 on a CUDA device that supports it, float32 otherwise."""
    import torch

    if spec == "auto":
        cuda = getattr(device, "type", str(device)) == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, spec)


def ensure_fast_tokenizer(m: ModelConfig, tokenizer: Any) -> tuple[Any, bool]:
    """Return a fast tokenizer (character offsets need one) and whether it was converted.

    A slow (pure Python) tokenizer is converted with ``transformers``' converters and kept
    only if it encodes a probe text exactly like the original; otherwise the error says
    how to provide a fast one.
    """
    if getattr(tokenizer, "is_fast", False):
        return tokenizer, False
    name = m.resolved_name()
    probe = "Hello world, déjà vu 123!\n    def f(x):\treturn x  # 東京 🙂"
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        backend = convert_slow_tokenizer(tokenizer)
        specials = {
            k: getattr(tokenizer, k)
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if getattr(tokenizer, k, None) is not None
        }
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
        same = fast(probe)["input_ids"] == tokenizer(probe)["input_ids"]
    except Exception as e:  # any converter failure means: no offsets available
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        if same:
            return fast, True
        reason = "the converted tokenizer encodes text differently from the original"
    raise ModelLoadError(
        f"model '{name}': tokenizer {type(tokenizer).__name__} from {m.tokenizer_path} is a "
        f"slow (Python) tokenizer without character offsets, and converting it to a fast one "
        f"failed ({reason}). Provide a fast tokenizer (a folder with tokenizer.json) through "
        f"`tokenizer:` for this model"
    )


def load_causal_lm(m: ModelConfig, device: Any = None, dtype: Any = None) -> Any:
    """Load a model with ``AutoModelForCausalLM`` after the checks above, in eval mode.

    Args:
        m: the model's configuration (``trust_remote_code`` and ``allow_pickle`` are
            honoured; both off by default).
        device: a ``torch.device``; default ``resolve_device(m.device)``.
        dtype: a ``torch.dtype``; default ``resolve_dtype(m.dtype, device)``.

    Raises:
        ModelLoadError: missing path, not a causal LM, pickle-only weights, or any loading
            failure (the message names the model and what to change).
    """
    from transformers import AutoModelForCausalLM

    base = adapter_base(m)
    if base is not None:  # a LoRA adapter: the base, with the update folded in
        try:
            from peft import PeftModel
        except ImportError as e:
            raise ModelLoadError(
                f"model '{m.resolved_name()}': {m.model} is a LoRA adapter; loading it needs "
                "peft (pip install 'fuselm[lora]')"
            ) from e
        model = load_causal_lm(base, device=device, dtype=dtype)
        return PeftModel.from_pretrained(model, m.model).merge_and_unload().eval()
    check_model_path(m)
    config = load_model_config(m)
    check_causal_lm(m, config)
    use_safetensors = check_weights_format(m)
    device = device if device is not None else resolve_device(m.device)
    dtype = dtype if dtype is not None else resolve_dtype(m.dtype, device)
    kw = _common_kwargs(m)
    kw["dtype"] = dtype
    if use_safetensors is not None:
        kw["use_safetensors"] = use_safetensors
    try:
        model = AutoModelForCausalLM.from_pretrained(m.model, **kw)
    except Exception as e:
        raise _explain(m, "model weights", m.model, e) from e
    return model.to(device).eval()
