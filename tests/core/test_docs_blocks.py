"""Code blocks in docs/ that are files or commands cannot drift from the code.

``$ rollfast …`` lines of ``console`` blocks run; ``$ pip install -e D`` / ``$ pytest D``
are accepted after ``$ rollfast new-plugin D …`` in the same block (tests/testing/test_scaffold.py
installs and tests that package); a block after ``<!-- scaffold: KIND NAME [FAMILY] -> PATH -->``
is part of the generated file PATH, one after ``<!-- same-as: PATH -->`` part of the
repository file PATH; a ``toml`` block carries one of these markers.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rollfast.cli import main
from rollfast.scaffold import write_plugin

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(?:<!-- (?P<marker>[a-z-]+): (?P<target>[^\n]*?) -->\n)?```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)```",
                   re.S)


def blocks():
    for page in DOCS:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.groupdict(), id=f"{page.name}:{line}")


BLOCKS = list(blocks())


def _generated(target: str, tmp_path: Path) -> str:
    spec, path = (s.strip() for s in target.split("->"))
    kind, name, *family = spec.split()
    root = write_plugin(name, kind, family=family[0] if family else None, dest=tmp_path)
    return (root / path).read_text()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.values[0]["marker"]])
def test_marked_block_is_part_of_its_file(block, tmp_path):
    marker, target, body = block["marker"], block["target"], block["body"]
    if marker == "scaffold":
        text = _generated(target, tmp_path)
    elif marker == "same-as":
        text = (ROOT / target.strip()).read_text()
    else:
        pytest.fail(f"unknown marker {marker!r}")
    assert body in text, f"the block is not part of {target}:\n{body}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.values[0]["lang"] == "toml"])
def test_toml_blocks_are_files(block):
    assert block["marker"], "a toml block is a file: mark it <!-- scaffold: ... --> or <!-- same-as: ... -->"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.values[0]["lang"] == "console"])
def test_console_commands_run(block, tmp_path, monkeypatch, capsys):
    """Every ``$ rollfast …`` line runs with the exit code the block shows (``$ echo $?``
    after it, else 0). ``rollfast compare`` lines train models: their names are resolved
    here (a misspelt one shown as an error must fail), the runs themselves are
    tests/compare/test_compare.py's."""
    monkeypatch.chdir(tmp_path)
    generated, lines = set(), [ln for ln in block["body"].splitlines() if ln.startswith("$ ")]
    code = None
    for i, line in enumerate(lines):
        argv = shlex.split(line[2:], comments=True)
        if argv[:2] == ["cd", "examples"] and "&&" in argv:
            argv = argv[argv.index("&&") + 1:]
        if argv == ["echo", "$?"]:
            continue
        expected = 2 if lines[i + 1:i + 2] == ["$ echo $?"] else 0
        if argv[:2] == ["rollfast", "compare"]:
            _check_compare_names(argv[2:], line)
        elif argv[0] == "rollfast":
            try:
                code = main(argv[1:])
            except SystemExit as exc:  # argparse's --help
                code = exc.code
            assert code == expected, f"`{line[2:]}` exited {code}: {capsys.readouterr().err}"
            if argv[1] == "new-plugin":
                generated.add(argv[2])
        elif argv[:3] == ["pip", "install", "-e"] or argv[0] == "pytest":
            assert argv[-1] in generated, f"`{line[2:]}`: not a package generated in this block"
        else:
            pytest.fail(f"`{line[2:]}` is not a command this test knows how to check")


def _check_compare_names(args: list[str], line: str) -> None:
    from rollfast.compare.names import parse

    valued = ("--task", "--out", "--steps", "--seeds", "--lr", "--budget")
    names = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in valued)]
    shown_as_error = "EPX" in line
    for name in names:
        try:
            parse(name)
        except Exception:
            assert shown_as_error, f"`{line[2:]}`: {name!r} does not resolve"
