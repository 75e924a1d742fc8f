from __future__ import annotations

import subprocess
import sys

import pytest

from fuselm.artifacts import Stage
from fuselm.cli import main

ALL_COMMANDS = (
    "prepare",
    "capture",
    "align",
    "train",
    "eval",
    "report",
    "run",
    "demo",
    "inspect",
    "status",
)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ALL_COMMANDS:
        assert f"    {cmd}" in out, cmd


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "fuselm", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("fuselm ")


def test_unimplemented_stage_exits_non_zero(
    base_config, write_config, tmp_path, capsys, monkeypatch
):
    """A stage whose issue has not landed says so and exits 3 (the mechanism later stages
    of the roadmap go through); `fuselm run` stops before it."""
    import fuselm.cli as cli

    monkeypatch.setitem(cli.STAGES, "align", (None, "align", "#4"))
    cfg = str(write_config(base_config))
    assert main(["align", "-c", cfg, "-o", str(tmp_path / "r")]) == 3
    assert "not implemented yet (tracked in issue #4)" in capsys.readouterr().err
    assert main(["run", cfg, "-o", str(tmp_path / "r")]) == 0
    assert Stage(tmp_path / "r", "capture/tgt").manifest() is not None
    assert not (tmp_path / "r" / "align").exists()


def test_inspect_runs_and_reports(base_config, write_config, capsys):
    import json

    assert main(["inspect", "-c", str(write_config(base_config)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {p["verdict"] for p in report["pairs"]} <= {"good", "usable", "poor"}


def test_run_executes_implemented_stages_in_order(base_config, write_config, tmp_path):
    run_dir = tmp_path / "r"
    cfg = write_config(dict(base_config, run_dir=str(run_dir)))
    assert main(["run", str(cfg)]) == 0  # run dir taken from the config
    assert Stage(run_dir, "prepare").manifest() is not None


def test_no_run_dir_is_an_error(base_config, write_config, capsys):
    assert main(["prepare", "-c", str(write_config(base_config))]) == 1
    assert "--run-dir" in capsys.readouterr().err


def test_stray_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["status", "somewhere", "--bogus"])
    assert e.value.code == 2


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_after_the_command(base_config, write_config, tmp_path, flag, monkeypatch):
    import os

    monkeypatch.setenv("FUSELM_QUIET", "")
    cfg = write_config(base_config)
    # As git and pip do: the global flag also after the command and its options (it used
    # to fail with "unrecognized arguments: -q").
    assert main(["prepare", "-c", str(cfg), "-o", str(tmp_path / "r"), flag]) == 0
    assert os.environ["FUSELM_QUIET"] == "1"
