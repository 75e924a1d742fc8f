"""Loading a pipeline configuration: YAML + ``a.b=c`` overrides -> validated dataclasses.

Why a module of its own: :mod:`fuselm.config.sections` says *what* a run can be configured
with (one dataclass per stage, with documentation and per-field checks); this module is
the machinery that turns user input into those dataclasses. It converts and validates
every value against the annotations (naming the full YAML key and a did-you-mean on
error), applies overrides, resolves relative paths against the YAML's folder and renders
``configs/reference.yaml`` from the field documentation.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from fuselm.config.sections import SECTIONS, ConfigError, PipelineConfig, _hints, _invalid

# --------------------------------------------------------------------------- loading


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if origin is Literal:
        allowed = list(get_args(tp))
        if value not in allowed:
            hint = _did_you_mean(str(value), [str(a) for a in allowed])
            raise _invalid(key, value, f"allowed: {', '.join(map(str, allowed))}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _invalid(key, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _invalid(key, value, "expected an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        raise _invalid(key, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _invalid(key, value, "expected a string")
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise _invalid(key, value, "expected a list")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise _invalid(key, value, "expected a mapping of fields")
        return from_dict(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, validating every key and value.

    Args:
        cls: the dataclass to build.
        data: parsed YAML (or override) mapping.
        prefix: the dotted key of ``data`` within the whole YAML, for error messages.

    Raises:
        ConfigError: unknown key (with a did-you-mean), wrong type or invalid value; the
            message names the full YAML key.
    """
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown key '{full}'{_did_you_mean(str(key), names)}; "
                f"valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):
            msg = f"{prefix}.{msg}" if re.match(r"^\w+:", msg) else f"{prefix}: {msg}"
        raise ConfigError(msg) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration as plain data (what manifests and config.json store)."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.field=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value (e.g. train.lr=2e-5)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return path, value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at ``path`` in the raw config dict.

    List items are addressed by index (``sources.0.dtype``) or by model name
    (``sources.llama.dtype``), so an override survives reordering of the YAML list.
    """
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if part == "sources" else {}
        node = node[part]
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {'.'.join(path)}: '{where}' is not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(items) <= idx < len(items):
            raise ConfigError(f"override {where}: index {idx} out of range ({len(items)} items)")
        return idx
    for i, item in enumerate(items):
        if isinstance(item, dict) and part in (item.get("name"), _basename(item.get("model"))):
            return i
    names = [
        str(it.get("name") or _basename(it.get("model"))) for it in items if isinstance(it, dict)
    ]
    raise ConfigError(f"override {where}: no list item named '{part}' (have: {', '.join(names)})")


def _basename(model: Any) -> str:
    return Path(str(model or "").rstrip("/")).name


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Load a pipeline YAML, apply ``section.field=value`` overrides, and validate.

    Relative local paths in the YAML (corpus inputs, model paths that exist on disk) are
    resolved against the YAML file's folder, so a config works from any working directory.

    Raises:
        ConfigError: the file is missing or not a mapping, or any key/value is invalid.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping with sections {', '.join(SECTIONS)}")
        data = loaded
        base = p.resolve().parent
    for item in overrides:
        keypath, value = parse_override(item)
        apply_override(data, keypath, value)
    _resolve_paths(data, base)
    try:
        return from_dict(PipelineConfig, data)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    if isinstance(data.get("run_dir"), str) and data["run_dir"]:
        data["run_dir"] = str((base / Path(data["run_dir"]).expanduser()).resolve())
    corpus = data.get("corpus")
    if isinstance(corpus, dict) and isinstance(corpus.get("inputs"), list):
        for item in corpus["inputs"]:
            if isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
                item["path"] = str((base / Path(item["path"]).expanduser()).resolve())
            if isinstance(item, dict) and isinstance(item.get("hf_data_files"), list):
                item["hf_data_files"] = [
                    str(base / Path(f).expanduser()) if isinstance(f, str) else f
                    for f in item["hf_data_files"]
                ]
    models = [data.get("target")] + list(data.get("sources") or [])
    for m in models:
        if not isinstance(m, dict):
            continue
        for key in ("model", "tokenizer"):
            v = m.get(key)
            # Only rewrite what exists locally: "org/name" hub ids must stay as they are.
            if isinstance(v, str) and v and (base / v).exists():
                m[key] = str((base / v).resolve())


# --------------------------------------------------------------------------- reference


def reference_yaml() -> str:
    """An annotated YAML with every field, its default and its documentation."""
    out = ["# fuselm pipeline configuration: every field with its default (generated).", ""]

    def emit(cls: type, indent: int, as_list_item: bool = False) -> None:
        hints = _hints(cls)
        first = True
        for fld in dataclasses.fields(cls):
            tp = hints[fld.name]
            pad = " " * indent
            lead = pad
            if as_list_item and first:
                lead = " " * (indent - 2) + "- "
            first = False
            out.append(f"{pad}# {fld.metadata.get('help', '')}")
            if dataclasses.is_dataclass(tp):
                out.append(f"{lead}{fld.name}:")
                emit(tp, indent + 2)
            elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
                out.append(f"{lead}{fld.name}:")
                emit(get_args(tp)[0], indent + 4, as_list_item=True)
            else:
                default = fld.default if fld.default is not dataclasses.MISSING else []
                if fld.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    default = fld.default_factory()  # type: ignore[misc]
                dumped = yaml.safe_dump(default, default_flow_style=True).strip()
                dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
                out.append(f"{lead}{fld.name}: {dumped}")

    emit(PipelineConfig, 0)
    return "\n".join(out) + "\n"
