"""The fidelity ledger (docs/fidelity.md) stays honest, and no file of the project points outside the repository.

- every option of conf/method has exactly one section (its heading names `method=<option>`), listed in the table of
  contents; methods that score (a scorer in their config, or scoring during training) state their scoring protocol;
- every test the ledger names (`tests/<file>.py::<name>`, optionally `[params]`; `::<name>` continues the file named
  before it in the same section) exists, found by parsing the test files (no pytest subprocess);
- no tracked file but README.md names the papers' internal file names, the shared notes or a path outside the
  repository (the patterns are assembled from pieces so this file does not match itself).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from peftbench.methods.base import Method

ROOT = Path(__file__).resolve().parent.parent
LEDGER = ROOT / "docs" / "fidelity.md"
OPTIONS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))

#: a test reference: a file (tests/test_x.py), a test in it (tests/test_x.py::name[params]) or, continuing the file
#: named before it, ::name[params]
REF = re.compile(r"(?<![\w/])(?:(tests/test_\w+\.py)(?:::(\w+))?|::(\w+))(\[[^\]\s]*\])?")
#: a reference that forgot the tests/ folder
BARE_REF = re.compile(r"(?<![\w/])test_\w+\.py::")


def sections() -> dict[str, str]:
    """Ledger sections by heading line (level 2), each with its text up to the next level-2 heading."""
    parts = re.split(r"^(## .*)$", LEDGER.read_text(), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def options_of(heading: str) -> list[str]:
    return re.findall(r"`method=(\w+)`", heading)


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def defined_tests(file: str) -> dict[str, bool]:
    """Test functions of ``tests/<file>`` (module level and in Test* classes): name -> parametrized."""
    tree = ast.parse((ROOT / "tests" / file).read_text())
    nodes = list(tree.body)
    nodes += [n for c in tree.body if isinstance(c, ast.ClassDef) and c.name.startswith("Test") for n in c.body]
    found = {}
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            found[node.name] = any("parametrize" in ast.unparse(d) for d in node.decorator_list)
    return found


def test_every_method_option_has_exactly_one_section_in_the_table_of_contents():
    named = [o for heading in sections() for o in options_of(heading)]
    assert sorted(named) == OPTIONS, "each conf/method option needs exactly one '## ... (`method=<option>`)' section"
    contents = sections()["## Contents"]
    anchors = set(re.findall(r"\]\(#([\w\-]+)\)", contents))
    for heading in sections():
        if options_of(heading):
            assert slug(heading) in anchors, f"table of contents lacks {heading!r} (#{slug(heading)})"


def scores(option: str) -> bool:
    """Whether the method scores something: a scorer in its config, or scoring during training (a training hook)."""
    target = OmegaConf.load(ROOT / "conf" / "method" / f"{option}.yaml")["_target_"]
    module, name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    return bool(cls.needs_scores) or cls.on_epoch_start is not Method.on_epoch_start


def test_scoring_methods_state_their_scoring_protocol():
    scoring = {o for o in OPTIONS if scores(o)}
    assert {"spt_lora", "gps", "heart_lora", "tina"} <= scoring  # the detection itself works
    for heading, text in sections().items():
        if set(options_of(heading)) & scoring:
            assert "scoring protocol" in text.lower(), f"{heading}: state the scoring protocol"


def test_every_test_the_ledger_names_exists():
    checked = 0
    for heading, text in sections().items():
        assert not BARE_REF.search(text), f"{heading}: name tests as tests/<file>.py::<name>"
        current = None
        for match in REF.finditer(text):
            path, name_in_file, continued, params = match.groups()
            if path:
                current = Path(path).name
                assert (ROOT / path).is_file(), f"{heading}: {path} does not exist"
            name = name_in_file or continued
            if name is None:
                continue  # a whole test file
            assert current is not None, f"{heading}: '::{name}' continues no test file"
            functions = defined_tests(current)
            assert name in functions, f"{heading}: tests/{current}::{name} does not exist"
            assert not params or functions[name], f"{heading}: tests/{current}::{name} is not parametrized"
            checked += 1
    assert checked > 100  # the ledger really names its tests


def outside_pointers() -> re.Pattern:
    """Internal file names of the papers, the shared notes, and paths outside the repository."""
    stems = [
        ["spt", "sensitivity", "aware", "peft"],
        ["heart", "lora", "appendix"],
        ["hifi", "high", "information", "heads"],
        ["cdra", "spt", "compact", "dynamic", "rank"],
        ["tina", "tiny", "adapters"],
    ]
    pieces = ["-".join(s) for s in stems] + ["REFER" + "ENCE", "../" + "shared", "shared/" + "papers", "/wo" + "rk/"]
    return re.compile("|".join(re.escape(p) for p in pieces) + "|" + r"\.txt, " + "Table")


def test_no_tracked_file_points_outside_the_repository():
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    pattern, hits = outside_pointers(), []
    for name in listed.splitlines():
        path = ROOT / name
        if name == "README.md" or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (weights)
        lines = enumerate(text.splitlines(), 1)
        hits += [f"{name}:{i}: {line.strip()[:80]}" for i, line in lines if pattern.search(line)]
    assert not hits, "cite papers by authors, title, venue, year (arXiv id), not by file or path:\n" + "\n".join(hits)
