"""`rollfast new-plugin`: each kind of scaffold, freshly generated, is a complete package
whose entry point loads, whose doctests pass and whose generated test (the kit) is green."""

from __future__ import annotations

import doctest
import importlib.util
import subprocess
import sys
import tomllib

import pytest

import rollfast
from rollfast.cli import main
from rollfast.scaffold import KINDS, ScaffoldError, write_plugin

FAMILY = {"mode": "kron"}


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh():
    rollfast.plugins.reset()
    yield
    rollfast.plugins.reset()


@pytest.mark.parametrize("kind", KINDS)
def test_generated_package_installs_and_passes_the_kit(kind, tmp_path, fresh, monkeypatch):
    name = f"new_{kind}"
    root = write_plugin(name, kind, family=FAMILY.get(kind), dest=tmp_path)
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "hatchling.build"
    assert meta["project"]["version"] == "0.1.0" and meta["project"]["dependencies"] == ["rollfast"]
    entry = meta["project"]["entry-points"]["rollfast"]
    assert entry == {name: f"rollfast_{name}"}

    # load the entry point as the registry would after `pip install`
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(entry[name])
    assert module.__doc__ and doctest.testmod(module).failed == 0
    rollfast.plugins.register(module, name)
    assert rollfast.registry().warnings(name) == []

    # run the generated test file: one case per check of the kit
    tests = _load(root / "tests" / f"test_{name}.py", f"generated_test_{name}")
    (mark,) = tests.test_conformance.pytestmark
    checks = mark.args[1]
    assert {"options", "jit", "leaves", "non-finite", "save/restore", "sharded"} <= set(checks)
    for check in checks:
        tests.test_conformance(check)


def test_cli_writes_a_package_and_refuses_bad_requests(tmp_path, capsys):
    assert main(["new-plugin", "clipper", "--kind", "mask", "--dest", str(tmp_path)]) == 0
    assert "pip install -e" in capsys.readouterr().out
    assert (tmp_path / "clipper" / "rollfast_clipper" / "__init__.py").exists()
    assert main(["new-plugin", "clipper", "--kind", "mask", "--dest", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["new-plugin", "m", "--kind", "mode", "--dest", str(tmp_path)]) == 2
    assert "needs --family (families with a mode template: kron)" in capsys.readouterr().err
    assert main(["new-plugin", "m", "--kind", "mode", "--family", "prism", "--dest", str(tmp_path)]) == 2
    assert "family 'prism' offers no mode template" in capsys.readouterr().err
    with pytest.raises(ScaffoldError, match="lowercase Python identifier"):
        write_plugin("My-Plugin", "family", dest=tmp_path)


@pytest.mark.slow
def test_generated_package_builds_a_wheel(tmp_path):
    pytest.importorskip("hatchling", reason="building without isolation needs hatchling installed")
    root = write_plugin("wheel_check", "round", dest=tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(root)], check=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("rollfast_wheel_check-0.1.0-")
