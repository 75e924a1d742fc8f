"""Bridge to EleutherAI's lm-evaluation-harness: downstream tasks on already-loaded models.

The eval stage calls ``run_lm_eval`` for the untouched target, the CLM-only control and the
fused target when ``eval.lm_eval_tasks`` is set. lm-eval is an optional extra
(``pip install 'fuselm[lmeval]'``); it is imported only here, only when tasks are asked for.

Reading top to bottom:

- ``require_lm_eval`` imports lm-eval or says how to install it.
- ``staged_include`` copies a folder of task YAMLs into a temporary folder, rewriting
  relative local data paths (``dataset_kwargs.data_files``, ``data_dir`` and a relative
  ``dataset_path``) so they resolve against the YAML that names them, not the working
  directory (which is what ``datasets`` would do). That is what makes a folder of
  "task YAML + jsonl" self-contained and usable offline.
- ``run_lm_eval`` wraps the model in lm-eval's ``HFLM`` (no reload by name), checks every
  task name against the index, loads each task's data up front so that a missing dataset is
  reported with the task's name, then evaluates one task at a time and returns
  ``{task: {metric: value}}``.

Offline use: with ``HF_DATASETS_OFFLINE=1`` only tasks whose data is local (or already in
the Hugging Face datasets cache) can run. The standard tasks (``arc_easy``, ``boolq``, ...)
need the hub once to fill the cache.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("fuselm.lmeval")

INSTALL_HINT = "pip install 'fuselm[lmeval]'"
YAML_SUFFIXES = (".yaml", ".yml")


class LmEvalError(RuntimeError):
    """lm-eval is missing, a task is unknown, or a task's data cannot be loaded."""


def require_lm_eval() -> Any:
    """Import and return the ``lm_eval`` module, or explain how to install it.

    Raises:
        LmEvalError: lm-eval is not installed (or fails to import).
    """
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM, checked here, used later)
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise LmEvalError(
            "eval.lm_eval_tasks is set but lm-evaluation-harness is not installed "
            f"({e}); install the optional extra: {INSTALL_HINT}"
        ) from e
    return lm_eval


# ------------------------------------------------------------------ local task folders


class _Tagged:
    """A YAML node with a custom tag (lm-eval's ``!function``), kept verbatim."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


def _yaml_classes() -> tuple[type, type]:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    def construct(loader: Any, suffix: str, node: Any) -> _Tagged:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return _Tagged("!" + suffix, value)

    def represent(dumper: Any, data: _Tagged) -> Any:
        if isinstance(data.value, dict):
            return dumper.represent_mapping(data.tag, data.value)
        if isinstance(data.value, list):
            return dumper.represent_sequence(data.tag, data.value)
        return dumper.represent_scalar(data.tag, data.value)

    Loader.add_multi_constructor("!", construct)
    Dumper.add_representer(_Tagged, represent)
    return Loader, Dumper


def _absolute(value: Any, base: Path) -> Any:
    """``value`` (a path, a list of paths or a split -> path(s) mapping) made absolute."""
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        return str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def _resolve_local_paths(cfg: dict[str, Any], base: Path) -> bool:
    """Make a task config's local data paths absolute (in place); True if anything changed."""
    changed = False
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if key in kwargs and not isinstance(kwargs[key], _Tagged):
                new = _absolute(kwargs[key], base)
                changed |= new != kwargs[key]
                kwargs[key] = new
    path = cfg.get("dataset_path")
    if isinstance(path, str) and path.startswith(("./", "../")):
        cfg["dataset_path"] = str((base / path).resolve())
        changed = True
    return changed


def _rewrite_yaml(staged: Path, original: Path, loader: type, dumper: type) -> None:
    import yaml

    try:
        cfg = yaml.load(original.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506
    except yaml.YAMLError as e:
        log.warning("lm-eval: cannot read %s (%s); left as is", original, e)
        return
    if isinstance(cfg, dict) and _resolve_local_paths(cfg, original.parent):
        staged.unlink()  # a link to the original: replace it, never write through it
        staged.write_text(yaml.dump(cfg, Dumper=dumper, sort_keys=False), encoding="utf-8")


@contextlib.contextmanager
def staged_include(include_path: str | Path) -> Iterator[Path]:
    """A temporary copy of a task folder whose relative data paths are made absolute.

    Files are linked, not copied (data stays where it is); only the YAMLs that name a
    relative local path are rewritten. Custom tags (``!function utils.fn``) are kept, and the
    modules they name sit beside the rewritten YAML as before.

    Raises:
        LmEvalError: the folder does not exist.
    """
    src = Path(include_path).expanduser().resolve()
    if not src.is_dir():
        raise LmEvalError(
            f"lm-eval: eval.lm_eval_include '{include_path}' is not a folder (it should "
            "hold task YAMLs and their local data files)"
        )
    loader, dumper = _yaml_classes()
    with tempfile.TemporaryDirectory(prefix="fuselm-lmeval-") as tmp:
        dst = Path(tmp) / src.name
        shutil.copytree(src, dst, copy_function=os.symlink, ignore=_ignore_caches)
        for staged in sorted(dst.rglob("*")):
            if staged.suffix in YAML_SUFFIXES and staged.is_symlink():
                _rewrite_yaml(staged, src / staged.relative_to(dst), loader, dumper)
        yield dst


def _ignore_caches(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", ".ipynb_checkpoints")]


# ------------------------------------------------------------------------ the bridge


def _check_tasks(task_manager: Any, tasks: Sequence[str], include: Path | None) -> None:
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    import lm_eval.tasks

    where = [f"lm-eval's built-in tasks ({Path(lm_eval.tasks.__file__).parent})"]
    where.append(
        f"eval.lm_eval_include ({include})" if include else "no eval.lm_eval_include folder"
    )
    hints = []
    for t in unknown:
        close = difflib.get_close_matches(t, known, n=3)
        if close:
            hints.append(f"'{t}': did you mean {', '.join(close)}?")
    raise LmEvalError(
        f"lm-eval: unknown task(s) {', '.join(repr(t) for t in unknown)}; searched "
        + " and ".join(where)
        + ". "
        + (" ".join(hints) + " " if hints else "")
        + "Put a task YAML for it in eval.lm_eval_include or fix the name."
    )


def _offline_hint() -> str:
    offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
    state = "the hub is off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set)" if offline else ""
    return (
        (state + "; " if state else "")
        + "provide the data locally: a task YAML in eval.lm_eval_include with `dataset_path: "
        "json` and `dataset_kwargs: {data_files: {test: my_task.jsonl}}` (paths relative to "
        "the YAML), or run once where the hub is reachable to fill the Hugging Face datasets "
        "cache"
    )


def _load_task(task_manager: Any, name: str) -> None:
    """Build one task (which loads its dataset) so that missing data names the task."""
    try:
        if hasattr(task_manager, "load"):  # lm-eval >= 0.4.10
            task_manager.load([name])
        else:
            from lm_eval.tasks import get_task_dict

            get_task_dict([name], task_manager)
    except Exception as e:  # datasets/hub/network/YAML errors all mean "cannot load it"
        raise LmEvalError(
            f"lm-eval: task '{name}' could not be loaded, most likely its data is not "
            f"available offline ({type(e).__name__}: {e}); {_offline_hint()}"
        ) from e


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "alias": ..}`` -> ``{"acc": 0.5}`` (``metric/filter`` if filtered)."""
    out = {}
    for key, value in row.items():
        if key == "alias" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric}/{filt}"] = float(value)
    return out


def wrap_model(model: Any, tokenizer: Any, batch_size: int = 8, max_length: int | None = None):
    """Lm-eval's ``HFLM`` around a loaded model (no reload by name).

    The tokenizer is copied because HFLM sets its pad token and fuselm caches tokenizers.
    """
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=batch_size,
        max_length=max_length,
    )


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    *,
    num_fewshot: int | None = None,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks in-process on an already-loaded causal LM.

    Args:
        model: a ``transformers`` causal LM (in eval mode, on its device).
        tokenizer: its tokenizer.
        tasks: lm-eval task, group or tag names (``arc_easy``, ``bbh``, or a task defined
            in ``include_path``).
        include_path: a folder of extra task YAMLs; relative data paths in them resolve
            against the YAML that names them.
        limit: evaluate at most this many documents per task (``None`` or 0 = all).
        batch_size: lm-eval batch size.
        num_fewshot: override the tasks' few-shot count (``None`` = each task's default).
        max_length: context length lm-eval assumes (``None`` = from the model config).

    Returns:
        ``{task: {metric: value}}`` for every evaluated task; a group also brings its
        subtasks' rows. Metric names drop lm-eval's ``,none`` filter suffix (``acc``,
        ``acc_norm``, ``acc_stderr``); other filters become ``metric/filter``.

    Raises:
        LmEvalError: lm-eval is missing, a task is unknown, or a task's data cannot be
            loaded (offline without local data).
    """
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        return {}
    with contextlib.ExitStack() as stack:
        include = stack.enter_context(staged_include(include_path)) if include_path else None
        task_manager = TaskManager(include_path=str(include) if include else None)
        _check_tasks(task_manager, tasks, Path(include_path).resolve() if include_path else None)
        for name in tasks:
            _load_task(task_manager, name)
        lm = wrap_model(model, tokenizer, batch_size=batch_size, max_length=max_length)
        out: dict[str, dict[str, float]] = {}
        for name in tasks:
            log.info("lm-eval: running %s%s", name, f" (limit {limit})" if limit else "")
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name],
                task_manager=task_manager,
                limit=limit or None,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                log_samples=False,
                bootstrap_iters=1000,
            )
            if res is None:  # non-zero rank in a distributed run
                continue
            for task_name, row in res.get("results", {}).items():
                out[task_name] = _metrics(row)
    return out


__all__ = [
    "INSTALL_HINT",
    "LmEvalError",
    "require_lm_eval",
    "run_lm_eval",
    "staged_include",
    "wrap_model",
]
