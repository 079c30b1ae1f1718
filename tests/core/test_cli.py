"""The `rollfast` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rollfast
from rollfast.cli import main

import toy_plugin


@pytest.fixture
def toy():
    rollfast.plugins.reset()
    rollfast.plugins.register(toy_plugin, "toy")
    yield
    rollfast.plugins.reset()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_groups_by_kind_with_providers(toy, capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "families"
    for heading in ("masks", "averages", "rounding rules", "partitioners"):
        assert heading in lines
    adamw = next(line for line in lines if line.split()[:1] == ["adamw"])
    assert "adam (rollfast " + rollfast.__version__ + ")" in adamw
    adamod = next(line for line in lines if line.split()[:1] == ["adamod"])
    assert "example (rollfast-example-plugin 0.1.0)" in adamod
    # modes are listed under their family
    toy_at = lines.index(next(line for line in lines if line.split()[:1] == ["toy"]))
    assert lines[toy_at + 1].split()[:2] == ["×", "EXP"]


def test_list_json_schema(toy, capsys):
    code, out, _ = run(capsys, "list", "--json")
    data = json.loads(out)
    assert code == 0 and data["schema"] == "rollfast.list/1"
    by_name = {(c["kind"], c["name"]): c for c in data["contributions"]}
    adamw = by_name[("family", "adamw")]
    assert adamw["distribution"] == "rollfast" and adamw["first_party"] is True
    lr = adamw["parameters"][0]
    assert lr == {"name": "learning_rate", "default": None, "required": True,
                  "doc": "step size, a float or an Optax schedule.",
                  "allowed": "a number > 0, or a schedule (callable step → value)"}
    assert adamw["parameters"][1]["default"] == 0.9
    mode = by_name[("mode", "Q0.5EQ1.5")]
    assert mode["family"] == "toy" and mode["aliases"] == ["Q0p5EQ1p5"]
    assert {c["kind"] for c in data["contributions"]} >= {"family", "mode", "mask", "average",
                                                          "round", "partition"}
    assert all(set(p) == {"plugin", "distribution", "version", "first_party", "module", "error"}
               for p in data["plugins"])


def test_list_modes_of_one_family(toy, capsys):
    code, out, _ = run(capsys, "list", "--kind", "mode", "--family", "toy")
    assert code == 0
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["toy", "×", "EXP"], ["toy", "×", "Q0.5EQ1.5"]]
    code, _, err = run(capsys, "list", "--kind", "mode", "--family", "tyo")
    assert code == 2 and "did you mean 'toy'" in err


def test_info_shows_parameters_modes_references(toy, capsys):
    code, out, _ = run(capsys, "info", "toy")
    assert code == 0
    assert "toy (family) — Momentum SGD whose mode scales" in out
    assert "  b1" in out and "= 0.5" in out and "momentum." in out
    assert "modes:" in out and "Q0.5EQ1.5" in out
    code, out, _ = run(capsys, "info", "adamw")
    assert "references:" in out and "arXiv:1711.05101" in out and "(required)" in out
    code, out, _ = run(capsys, "info", "example")
    assert code == 0 and "rollfast-example-plugin" in out and "adamod" in out


def test_info_unknown_name_exits_2_with_suggestion(toy, capsys):
    code, _, err = run(capsys, "info", "adamx")
    assert code == 2 and "'adam'" in err


def test_plugins_command(capsys):
    rollfast.plugins.reset()
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert any(line.split()[:2] == ["example", "rollfast-example-plugin"] for line in out.splitlines())
    assert any(line.split()[:2] == ["adam", "rollfast"] for line in out.splitlines())


def test_console_script_exit_code():
    script = Path(sys.executable).parent / "rollfast"
    done = subprocess.run([str(script), "info", "adamww"], capture_output=True, text=True)
    assert done.returncode == 2 and "did you mean 'adamw'" in done.stderr
